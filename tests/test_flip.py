"""Coefficient-space horizontal flip: orientation permutation, spatial alignment, measured error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scatstore.transforms.flip import (channel_permutation, crop_cells, filter_angles,
                                       flip_coefficients, orientation_permutation, random_flip,
                                       path_pairs)


def _scattering(J, size, L=8, max_order=1):
    try:
        from scatstore import Scattering2D

        return Scattering2D(J=J, shape=(size, size), L=L, max_order=max_order)
    except Exception:  # noqa: BLE001 - the reference, while scatstore's transform is not there
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        return ScatteringTorch2D(J=J, shape=(size, size), L=L, max_order=max_order)


def _photos(size, names=("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")):
    from PIL import Image

    from scatstore.sample_data import load_image

    out = []
    for n in names:
        im = Image.fromarray(load_image(n))
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        out.append(np.asarray(im.resize((size, size), Image.BILINEAR)))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255).contiguous()
    return x


def test_orientation_permutation_even_L_is_L_minus_2_minus_theta():
    for L in (2, 4, 6, 8, 12, 16):
        assert orientation_permutation(L).tolist() == [(L - 2 - t) % L for t in range(L)]
    assert orientation_permutation(8).tolist() == [6, 5, 4, 3, 2, 1, 0, 7]


@pytest.mark.parametrize("L", [3, 5, 6, 7, 8])
def test_permutation_negates_the_filter_angle_modulo_pi(L):
    p = orientation_permutation(L)
    a = filter_angles(L)
    d = (a[p] + a) / np.pi  # a[p[l]] == -a[l] (mod pi)
    assert np.allclose(d, np.round(d))
    assert (p[p] == np.arange(L)).all()  # an involution
    if L % 2:  # odd L: the formula differs from (L - 2 - l) mod L
        assert p.tolist() != [(L - 2 - t) % L for t in range(L)]


def test_permutation_matches_the_filter_bank():
    """psi_{p(l)} is psi_l mirrored left-right (columns), up to the point reflection that the
    modulus does not see: checked on kymatio's Fourier filters."""
    from kymatio.scattering2d.filter_bank import filter_bank

    L, M = 8, 32
    psi = filter_bank(M, M, 2, L)["psi"]
    p = orientation_permutation(L)
    for f in psi:
        j, t = f["j"], f["theta"]
        g = next(h for h in psi if h["j"] == j and h["theta"] == p[t])
        a, b = np.asarray(f["levels"][0]), np.asarray(g["levels"][0])
        mirror = np.roll(a[:, ::-1], 1, axis=1)  # k2 -> -k2 (mod M)
        point = np.roll(np.roll(a[::-1, :], 1, axis=0), 0, axis=1)  # k1 -> -k1
        err = min(np.abs(mirror - b).max(), np.abs(point - b).max())
        assert err < 1e-5 * np.abs(b).max(), (j, t, err)


def test_channel_permutation_order2_and_paths():
    for J, order in ((3, 1), (2, 2), (3, 2)):
        mine = path_pairs(J, 8, order)
        assert mine[0] == () and mine[1] == ((0, 0),) and mine[1 + 8 * J - 1] == ((J - 1, 7),)
        if order == 2:
            assert mine[1 + 8 * J] == ((0, 0), (1, 0))
        p = channel_permutation(J, 8, order)
        assert sorted(p.tolist()) == list(range(len(mine)))
        assert (p[p] == np.arange(len(p))).all()
        perm = orientation_permutation(8)
        for k, path in enumerate(mine):
            assert mine[p[k]] == tuple((j, int(perm[t])) for j, t in path)


def test_flip_layouts_backends_and_involution():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 25, 8, 8)).astype(np.float32)
    a = flip_coefficients(x, 3)
    b = flip_coefficients(x.reshape(2, 75, 8, 8), 3).reshape(a.shape)
    c = flip_coefficients(torch.from_numpy(x), 3).numpy()
    assert np.allclose(a, b) and np.allclose(a, c, atol=1e-6)
    # "cell" alignment only relabels values: flipping twice restores all but column 0
    twice = flip_coefficients(flip_coefficients(x, 3, align="cell"), 3, align="cell")
    assert np.array_equal(twice[..., 1:], x[..., 1:])
    none2 = flip_coefficients(flip_coefficients(x, 3, align="none"), 3, align="none")
    assert np.array_equal(none2, x)
    assert flip_coefficients(x.astype(np.float16), 3).dtype == np.float16
    with pytest.raises(ValueError):
        flip_coefficients(x[:, :, :24], 3)


def test_flip_error_on_real_photos_beats_alternatives():
    """Measured error against scattering of the flipped image (documented in docs/loading.md)."""
    J, L, size = 3, 8, 128
    S = _scattering(J, size)
    x = _photos(size)
    with torch.no_grad():
        a = S(x)
        b = S(x.flip(-1).contiguous())

    def rel(est, sl=slice(None)):
        return float((est[:, :, sl] - b[:, :, sl]).norm() / b[:, :, sl].norm())

    order1 = slice(1, 1 + J * L)
    ours = {al: rel(flip_coefficients(a, J, L, align=al), order1) for al in ("none", "cell", "interp")}
    # alternatives: identity, theta -> -theta, reversal, all with the same spatial alignment
    def alt(perm_theta):
        p = np.concatenate([[0], [1 + j * L + perm_theta[t] for j in range(J) for t in range(L)]])
        xf = a[:, :, p].flip(-1)
        sh = torch.cat([xf[..., :1], xf[..., :-1]], -1)
        return rel(torch.lerp(sh, xf, 1 / 8), order1)

    alts = {"identity": alt(np.arange(L)), "negate": alt((-np.arange(L)) % L),
            "reverse": alt(L - 1 - np.arange(L))}
    assert ours["interp"] < min(alts.values()) * 0.6, (ours, alts)
    assert ours["interp"] < ours["cell"] < ours["none"]
    assert ours["interp"] < 0.2 and ours["none"] > 0.3, ours
    # the low-pass channel S0 needs no permutation: its error is the grid shift alone
    assert rel(flip_coefficients(a, J, L), slice(0, 1)) < 0.1


def test_random_flip_and_crop_cells():
    x = torch.arange(4 * 75 * 8 * 8, dtype=torch.float32).reshape(4, 75, 8, 8)
    g = torch.Generator().manual_seed(0)
    y = random_flip(x, 3, generator=g, p=1.0)
    assert torch.equal(y, flip_coefficients(x, 3))
    assert torch.equal(random_flip(x, 3, p=0.0), x)
    c = crop_cells(x, 2, generator=torch.Generator().manual_seed(1))
    assert c.shape == (4, 75, 6, 6)
    for i in range(4):  # every sample is a whole-cell window of its own map
        hits = [(t, l) for t in range(3) for l in range(3) if torch.equal(c[i], x[i, :, t:t + 6, l:l + 6])]
        assert len(hits) == 1
    assert torch.equal(crop_cells(x, 2, random=False), x[..., 1:7, 1:7])
