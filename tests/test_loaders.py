"""The streaming loaders over zarr, webdataset and HDF5 stores built by the encode job."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from scatstore.loaders import loader
from scatstore.stores import StoreError, open_dataset


def _encode(src, out, **kw):
    from scatstore.pipelines.encode import EncodeConfig, encode

    encode(EncodeConfig(src=src, out=out, size=64, shard_size=8, progress=False, **kw),
           log=lambda m: None)
    return out


def _clone(src: Path, out: Path, fmt: str, compression: str = "none", shard_size: int | None = None):
    """Rewrite a store's samples in another format / compression through the store writers."""
    from scatstore.stores import ShardBatch, StoreSpec, writer_for

    ds = open_dataset(src, raw=True)
    old = ds.spec
    spec = StoreSpec(format=fmt, n_slots=old.n_slots, shard_size=shard_size or old.shard_size,
                     sample_shape=old.sample_shape, dtype=old.dtype, quantized=old.quantized,
                     has_hw=old.has_hw, compression=compression, quant_scheme=old.quant_scheme)
    w = writer_for(out, spec)
    w.prepare()
    recs = []
    for s in range(spec.n_shards):
        lo, hi = spec.shard_range(s)
        idx = np.flatnonzero((ds.slots >= lo) & (ds.slots < hi))
        b = ds.get_batch(idx)
        metas = [{k: v for k, v in ds[int(i)][2].items() if k not in ("key", "slot", "qscale", "qoffset", "hw")}
                 for i in idx]
        kw = {"qscale": b["qscale"], "qoffset": b["qoffset"]} if spec.quantized else {}
        if spec.has_hw:
            kw["hw"] = b["hw"]
        recs.append(w.write_shard(s, ShardBatch(slots=b["slot"], keys=b["key"], x=b["x"], y=b["y"],
                                                meta=metas, **kw)))
    m = {k: v for k, v in ds.manifest.items()
         if k in ("method", "class_names", "preprocess", "categories")}
    if spec.quantized:
        m["quantization"] = {"scheme": spec.quant_scheme}
    w.finalize(m, recs)
    return out


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
    from scatstore.sources.demo_data import make_imagenet_layout

    root = tmp_path_factory.mktemp("loaders")
    src = make_imagenet_layout(root / "src", n_per_class=5, seed=3)
    out = {"src": src}
    out["zarr"] = _encode(src, root / "zarr", format="zarr")
    out["wds"] = _encode(src, root / "wds", format="wds")
    out["h5"] = _encode(src, root / "h5", format="h5")
    out["zarr_u8"] = _encode(src, root / "zarr_u8", format="zarr", dtype="uint8")
    out["aug"] = _encode(src, root / "aug", format="wds", augment=3)
    out["zarr_raw"] = _clone(out["zarr"], root / "zarr_raw", "zarr", "none")
    out["h5_raw"] = _clone(out["h5"], root / "h5_raw", "h5", "none")
    out["wds_u8"] = _clone(out["zarr_u8"], root / "wds_u8", "wds")
    out["h5_u8"] = _clone(out["zarr_u8"], root / "h5_u8", "h5", "none")
    return out


ALL = ["zarr", "wds", "h5", "zarr_raw", "h5_raw", "zarr_u8", "wds_u8", "h5_u8"]


def _collect(ep):
    xs, ys, idx = [], [], []
    for k, (x, y) in enumerate(ep):
        xs.append(x.clone())
        ys.append(y.clone())
        idx.append(ep.batch_indices(ep.start_step + k))
    return xs, ys, idx


@pytest.mark.parametrize("name", ALL)
def test_batches_equal_dataset_items(stores, name):
    ds = open_dataset(stores[name])
    ld = loader(stores[name], 4, shuffle=True, seed=7, drop_last=False, num_workers=2,
                buffer_size=9)  # several windows, batches straddling them
    ep = ld(0)
    xs, ys, idx = _collect(ep)
    assert len(xs) == len(ep) == -(-len(ds) // 4)
    seen = np.concatenate(idx)
    assert sorted(seen.tolist()) == list(range(len(ds)))  # every sample exactly once
    for x, y, ii in zip(xs, ys, idx):
        ref = np.stack([ds[int(i)][0] for i in ii]).reshape(x.shape)
        assert x.dtype == torch.float32 and x.shape[1:] == (75, 8, 8)
        np.testing.assert_array_equal(x.numpy(), ref)
        assert y.tolist() == [ds[int(i)][1] for i in ii]
    assert ld.bytes_read > 0
    assert ld.reader.name == {"zarr": "zarr", "wds": "wds", "h5": "h5"}[ds.spec.format]


def test_fast_paths_are_used(stores):
    assert loader(stores["zarr_raw"], 4).reader.mode == "raw"
    assert loader(stores["zarr"], 4).reader.mode == "zstd"
    assert loader(stores["zarr"], 4).reader.converts and loader(stores["zarr_raw"], 4).reader.converts
    assert not loader(stores["zarr_u8"], 4).reader.converts
    assert loader(stores["h5_raw"], 4).reader._layout(0)[0] == "direct"
    assert loader(stores["h5"], 4).reader._layout(0)[0] == "library"


def test_uint8_dequantized_close_to_float16(stores):
    a = loader(stores["zarr_u8"], 8, shuffle=False)
    b = loader(stores["zarr"], 8, shuffle=False)
    for (xq, yq), (xf, yf) in zip(a, b):
        assert torch.equal(yq, yf)
        rng = xf.amax(dim=(-2, -1), keepdim=True) - xf.amin(dim=(-2, -1), keepdim=True)
        assert ((xq - xf).abs() <= rng / 255 * 0.5 + 1e-2 * rng + 1e-3).all()
    # stored dtype kept (float16) on request
    x, _ = next(iter(loader(stores["zarr"], 4, dtype=None)))
    assert x.dtype == torch.float16


def test_determinism_and_epochs(stores):
    p = stores["zarr_raw"]

    def order(**kw):
        ld = loader(p, 4, **kw)
        return np.concatenate([ld(kw.pop("epoch", 0)).batch_indices(k) for k in range(len(ld))])

    a = loader(p, 4, seed=1)
    b = loader(p, 4, seed=1)
    ya = [y.tolist() for _, y in a(0)]
    yb = [y.tolist() for _, y in b(0)]
    assert ya == yb
    e0 = np.concatenate([a(0).batch_indices(k) for k in range(len(a))])
    e1 = np.concatenate([a(1).batch_indices(k) for k in range(len(a))])
    s2 = np.concatenate([loader(p, 4, seed=2)(0).batch_indices(k) for k in range(len(a))])
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, s2)
    # no shuffle: slot order
    ns = loader(p, 4, shuffle=False)
    n = len(open_dataset(p))
    assert np.concatenate([ns(0).batch_indices(k) for k in range(len(ns))]).tolist() == list(range(n))
    # plain iteration advances the epoch
    it = loader(p, 4, seed=1)
    list(it)
    assert it.epoch == 1
    assert [y.tolist() for _, y in it] == [y.tolist() for _, y in a(1)]


def test_resume_from_step_equals_tail(stores):
    p = stores["wds"]
    full = loader(p, 3, seed=5, drop_last=False, buffer_size=7)
    xs, ys, idx = _collect(full(2))
    for k in (0, 1, 3, 4, len(xs) - 1, len(xs)):
        ep = full(2, start_step=k)
        assert len(ep) == len(xs) - k
        txs, tys, tidx = _collect(ep)
        assert all(torch.equal(a, b) for a, b in zip(txs, xs[k:]))
        assert [t.tolist() for t in tidx] == [t.tolist() for t in idx[k:]]
    # state_dict round trip through plain iteration
    ld = loader(p, 3, seed=5, drop_last=False, buffer_size=7, epoch=2)
    it = iter(ld)
    for _ in range(3):
        next(it)
    st = ld.state_dict()
    assert st["epoch"] == 2 and st["step"] == 3
    it.close()
    ld2 = loader(p, 3, seed=5, drop_last=False, buffer_size=7)
    ld2.load_state_dict(st)
    rest = [x for x, _ in ld2]
    assert len(rest) == len(xs) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, xs[3:]))


def test_resume_skips_reading(stores):
    p = stores["zarr_raw"]
    ld = loader(p, 4, seed=0, drop_last=False, buffer_size=4)
    list(ld(0, start_step=len(ld(0)) - 1))
    one = ld.bytes_read
    ld = loader(p, 4, seed=0, drop_last=False, buffer_size=4)  # fresh: no chunk checked yet
    list(ld(0))
    assert one * 3 < ld.bytes_read


def test_augment_variants_one_per_image_per_epoch(stores):
    p = stores["aug"]
    ds = open_dataset(p)
    n_src = len(open_dataset(stores["zarr"]))
    assert len(ds) == 3 * n_src and ds.manifest["preprocess"]["augment"] == 3
    ld = loader(p, 5, seed=0, drop_last=False)
    draws = []
    for e in range(6):
        sel = ld.selected(e)
        metas = [ds[int(i)][2] for i in sel]
        src = [m["source_key"] for m in metas]
        assert len(sel) == n_src and len(set(src)) == n_src  # one variant per source image
        draws.append([m["variant"] for m in metas])
        ep = ld(e)
        got = np.concatenate([ep.batch_indices(k) for k in range(len(ep))])
        assert sorted(got.tolist()) == sorted(sel.tolist())
    draws = np.asarray(draws)
    assert (draws != draws[0]).any()  # the draw changes with the epoch
    assert set(np.unique(draws)) == {0, 1, 2}
    assert np.array_equal(loader(p, 5, seed=0).selected(4), ld.selected(4))  # deterministic
    assert len(list(loader(p, 5, variants="all", drop_last=False)(0))) == -(-3 * n_src // 5)
    # batches carry the drawn variants' data
    x, y = next(iter(ld(0)))
    i0 = ld(0).batch_indices(0)
    np.testing.assert_array_equal(x.numpy(), np.stack([ds[int(i)][0] for i in i0]).reshape(x.shape))


def test_flip_and_crop_options(stores):
    p = stores["zarr_raw"]
    base = loader(p, 5, seed=0)
    aug = loader(p, 5, seed=0, flip=True, crop_cells=2)
    assert aug.input_size == 6
    for (x0, y0), (x1, y1) in zip(base(0), aug(0)):
        assert x1.shape == (5, 75, 6, 6) and torch.equal(y0, y1)
    a = [x for x, _ in loader(p, 5, seed=0, flip=True)(1)]
    b = [x for x, _ in loader(p, 5, seed=0, flip=True)(1)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = [x for x, _ in loader(p, 5, seed=0, flip=True)(2)]
    assert not all(torch.equal(u, v) for u, v in zip(a, c))  # a fresh draw each epoch


def test_tar_member_names_are_checked_not_trusted(stores, tmp_path):
    p = shutil.copytree(stores["wds"], tmp_path / "wds")
    ds = open_dataset(p)
    from scatstore.stores.index_npy import load_index_npy

    ix = load_index_npy(Path(p), ds.manifest)
    off = int(ix["off_x_npy"][0]) - 512
    tar = Path(p) / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    data[off:off + 10] = b"../../evil"
    tar.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="not the expected"):
        list(loader(p, 25, shuffle=False, drop_last=False)(0))


# ------------------------------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, path, outdir, batch):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for drop_last in (True, False):
            ld = loader(path, batch, seed=3, drop_last=drop_last, num_workers=1)
            assert ld.rank == rank and ld.world_size == world
            for epoch in (0, 1):
                ep = ld(epoch)
                idx, n = [], 0
                for k, (x, y) in enumerate(ep):
                    idx.append(ep.batch_indices(k).tolist())
                    n += 1
                    dist.barrier()  # a rank with fewer batches would hang here
                res[f"{drop_last}-{epoch}"] = {"batches": n, "len": len(ep), "idx": idx}
            dist.barrier()
        Path(outdir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_disjoint_equal_batches(stores, tmp_path):
    import torch.multiprocessing as mp

    path = str(stores["zarr_raw"])
    n, B = len(open_dataset(path)), 3
    assert n % 2 == 1  # uneven over 2 ranks
    mp.spawn(_ddp_worker, args=(2, _free_port(), path, str(tmp_path), B), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    for drop_last, e in ((True, 0), (True, 1), (False, 0), (False, 1)):
        a, b = r[0][f"{drop_last}-{e}"], r[1][f"{drop_last}-{e}"]
        assert a["batches"] == b["batches"] == a["len"] == b["len"]
        sa = {i for bt in a["idx"] for i in bt}
        sb = {i for bt in b["idx"] for i in bt}
        if drop_last:
            assert a["batches"] == (n // 2) // B >= 1  # whole batches of the smaller block
            assert not sa & sb
            assert all(len(bt) == B for bt in a["idx"] + b["idx"])
        else:
            assert a["batches"] == -(-(-(-n // 2)) // B)  # ceil(n/2) per rank, one wrapped
            assert sa | sb == set(range(n))
            assert len(sa & sb) <= 1  # at most the one wrap-around sample
            assert [len(bt) for bt in a["idx"]] == [len(bt) for bt in b["idx"]]
    assert r[0]["True-0"]["idx"] != r[0]["True-1"]["idx"]


def test_bench_load_cli(stores):
    from click.testing import CliRunner

    from scatstore.cli.loading import bench_load_cmd

    res = CliRunner().invoke(bench_load_cmd, [str(stores["wds"]), "--jpeg", str(stores["src"]),
                                              "--batch-size", "8", "--num-workers", "0",
                                              "--seconds", "0.3", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "plain webdataset" in res.output and "JPEG" in res.output and "vs JPEG" in res.output


def test_cae_bitstream_store_decoded_by_the_recorded_codec(stores, tmp_path):
    from scatstore.codecs import fit_codec, load_codec
    from scatstore.sample_data import load_image

    imgs = [load_image(n) for n in ("astronaut", "coffee")]
    codec = fit_codec(imgs, channels=4, beta=0.01, steps=2, batch_size=2, size=32, hidden=8,
                      progress=False)
    path = tmp_path / "tiny.codec"
    codec.save(path)
    out = _encode(stores["src"], tmp_path / "cae", method="cae", codec=str(path), format="wds")
    ds, codec = open_dataset(out), load_codec(path)
    ld = loader(out, 4, drop_last=False)
    assert ld.in_channels == 4
    ep = ld(0)
    for k, (x, y) in enumerate(ep):
        idx = ep.batch_indices(k)
        ref = codec.dequantize(codec.decode_symbols([ds[int(i)][0] for i in idx]))
        assert x.dtype == torch.float32 and torch.equal(x, ref)
        assert y.tolist() == [ds[int(i)][1] for i in idx]
    assert ld.bytes_read > 0


def test_bench_timing_refuses_a_loader_without_batches():
    # A store smaller than one batch (drop_last) yields empty epochs: the timing loop must stop
    # with a clear error instead of chaining empty epochs forever.
    from scatstore.loaders import bench

    with pytest.raises(ValueError, match="fewer samples than one batch"):
        bench._timed(lambda epoch: iter(()), seconds=0.1, bytes_fn=lambda: 0)


# ------------------------------------------------------------------ conversion kernels
def _builds():
    """(name, lib) for the CPU's build and every lower ISA level this CPU can run."""
    from scatstore import _cbuild
    from scatstore.loaders import convert

    out = [("auto", convert.load())]
    for lv in _cbuild.isa_levels()[1:]:
        out.append((lv, convert.library_for(lv).load()))
    return [(n, lib) for n, lib in out if lib is not None]


def _real_coefficients(stores, name="zarr", n=None):
    ds = open_dataset(stores[name], raw=True)
    idx = np.arange(len(ds) if n is None else min(n, len(ds)))
    return ds.get_batch(idx)


def test_f16_kernel_exact_on_every_half_and_on_real_batches(stores):
    from scatstore.loaders import convert

    builds = _builds()
    if not builds:
        pytest.skip("no C compiler: the loader converts with torch")
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    ref = every.float()
    x = torch.from_numpy(np.ascontiguousarray(_real_coefficients(stores)["x"]))
    assert x.dtype == torch.float16
    # > 4 MB of output (the streaming-store path) with an odd start (unaligned destination)
    big = x.reshape(-1).repeat(-(-(1_200_000) // x.numel()))[: 1_200_001]
    for name, lib in builds:
        out = torch.empty(65536)
        convert.f16_to_f32(every, out, lib=lib)
        same = (out.view(torch.int32) == ref.view(torch.int32)) | (out.isnan() & ref.isnan())
        assert bool(same.all()), name
        dst = torch.full((big.numel() + 1,), -1.0)
        convert.f16_to_f32(big, dst[1:], lib=lib)
        assert torch.equal(dst[1:], big.float()) and dst[0] == -1.0, name


@pytest.mark.parametrize("scheme", ["affine", "sqrt"])
def test_uint8_kernels_bit_identical_to_dequantize_uint8(stores, scheme):
    from scatstore.loaders import convert
    from scatstore.transforms.quantize import dequantize_uint8, quantize_uint8

    xf = _real_coefficients(stores)["x"].astype(np.float32)
    q, qs, qo = quantize_uint8(xf, scheme=scheme)
    ref = dequantize_uint8(q, qs, qo, scheme=scheme)
    for name, lib in _builds() + [("torch", None)]:
        out = torch.empty(q.shape)
        if lib is None:
            convert.select(use_torch=True)
        try:
            convert.dequantize_into(torch.from_numpy(q), out, torch.from_numpy(qs),
                                    torch.from_numpy(qo), scheme, lib=lib)
        finally:
            convert.select()
        np.testing.assert_array_equal(out.numpy(), ref, err_msg=name)
    with pytest.raises(ValueError, match="maps"):
        convert.dequantize_into(torch.from_numpy(q), torch.empty(q.shape), torch.ones(7),
                                torch.ones(7))


def test_pixel_kernel_equals_torch_normalisation():
    from skimage import data

    from scatstore.loaders import convert
    from scatstore.loaders.stream import IMAGENET_MEAN, IMAGENET_STD

    imgs = np.stack([np.ascontiguousarray(im[:128, :128, :3].transpose(2, 0, 1))
                     for im in (data.astronaut(), data.chelsea(), data.coffee())])
    x = torch.from_numpy(imgs)
    ref = x.float().mul_(1.0 / 255.0)
    ref.sub_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)).div_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    for name, lib in _builds():
        out = torch.empty(x.shape)
        convert.normalize_pixels_into(x, out, IMAGENET_MEAN, IMAGENET_STD, lib=lib)
        assert torch.equal(out, ref), name
        convert.normalize_pixels_into(x, out, lib=lib)
        assert torch.equal(out, x.float().mul_(1.0 / 255.0)), name


def test_kernel_chosen_from_cpu_features(monkeypatch):
    from scatstore import _cbuild
    from scatstore.loaders import convert

    info = convert.kernel_info()
    if not info["available"]:
        pytest.skip(f"no conversion kernels here: {info['why']}")
    assert info["isa"] == _cbuild.isa_level()
    expect = {"x86-64-v4": "avx512f", "x86-64-v3": "f16c-avx2", "aarch64-neon": "neon",
              "aarch64-sve": "neon"}.get(info["isa"], "generic")
    assert info["kernel"].startswith(expect)
    assert info["f16_to_f32"] == info["kernel"] or expect == "generic"
    monkeypatch.setenv("SCATSTORE_CONVERT", "torch")
    assert convert.kernel_info()["kernel"] == "torch" and convert.load() is None
    monkeypatch.delenv("SCATSTORE_CONVERT")
    if "x86-64-v3" in _cbuild.isa_levels():
        monkeypatch.setenv("SCATSTORE_ISA", "x86-64-v3")
        convert._reset_for_tests()
        try:
            assert convert.kernel_info()["kernel"] == "f16c-avx2-vcvtph2ps"
        finally:
            monkeypatch.delenv("SCATSTORE_ISA")
            convert._reset_for_tests()


@pytest.mark.parametrize("name", ["zarr_raw", "zarr_u8"])
def test_loader_same_batches_with_torch_conversion(stores, name):
    from scatstore.loaders import convert

    a = [x for x, _ in loader(stores[name], 5, shuffle=True, seed=3, num_workers=2)]
    convert.select(use_torch=True)
    try:
        b = [x for x, _ in loader(stores[name], 5, shuffle=True, seed=3, num_workers=2)]
    finally:
        convert.select()
    assert len(a) == len(b) > 1
    for xa, xb in zip(a, b):
        assert xa.dtype == torch.float32 and torch.equal(xa, xb)


def test_pixel_store_batches_normalised(stores, tmp_path):
    from scatstore.loaders.stream import IMAGENET_MEAN, IMAGENET_STD

    p = _encode(stores["src"], tmp_path / "raw", format="zarr", method="raw")
    ds = open_dataset(p, raw=True)
    ld = loader(p, 4, shuffle=False, num_workers=2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    k = 0
    for x, y in ld:
        raw = torch.from_numpy(np.ascontiguousarray(ds.get_batch(np.arange(k, k + len(y)))["x"]))
        ref = raw.float().mul_(1.0 / 255.0).sub_(mean).div_(std)
        assert torch.equal(x, ref.reshape(x.shape))
        k += len(y)
    assert k == len(ds)


@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+sve"])
def test_conversion_kernels_on_aarch64_under_qemu(tmp_path, march):
    """The NEON variant, cross-built with Debian's aarch64 compiler and run under qemu-user
    (correctness only), against torch / numpy on the host."""
    import shutil
    import subprocess

    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (cc and qemu):
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install "
                    "gcc-aarch64-linux-gnu qemu-user)")
    here = Path(__file__).parent
    src_dir = here.parent / "scatstore" / "loaders"
    exe = tmp_path / "harness"
    subprocess.run([cc, "-O2", f"-march={march}", "-ffp-contract=off", "-std=gnu99", "-static",
                    f"-I{src_dir}", str(here / "convert_harness.c"), "-o", str(exe)], check=True)
    raw = subprocess.run([qemu, str(exe)], capture_output=True, check=True, timeout=300).stdout
    name = raw[:64].rstrip(b"\0").decode()
    assert name == "neon-fcvtl"
    v = np.frombuffer(raw[64:], dtype="<f4")
    every, v = v[:65536], v[65536:]
    ref = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    assert np.array_equal(every.view(np.uint32)[~np.isnan(ref)], ref.view(np.uint32)[~np.isnan(ref)])
    assert np.isnan(every[np.isnan(ref)]).all()
    g, v = v[:3000], v[3000:]
    halves = (np.arange(6000) * 7 + 1).astype(np.uint16).view(np.float16)
    gref = np.concatenate([halves[100 * k: 100 * k + 100] for k in range(30)]).astype(np.float32)
    assert np.array_equal(g, gref, equal_nan=True)
    q = (np.arange(6 * 784) % 251).astype(np.uint8).reshape(1, 6, 28, 28)
    a = (np.float32(0.01) * np.arange(1, 7, dtype=np.float32)).reshape(1, 6)
    b = (np.arange(6, dtype=np.float32) - np.float32(2.5)).reshape(1, 6)
    from scatstore.transforms.quantize import dequantize_uint8

    aff, sq, nrm = v[:4704], v[4704:9408], v[9408:]
    np.testing.assert_array_equal(aff, dequantize_uint8(q, a, b, "affine").reshape(-1))
    np.testing.assert_array_equal(sq, dequantize_uint8(q, a, b, "sqrt").reshape(-1))
    mean = np.float32(0.1) * np.arange(6, dtype=np.float32)
    std = np.float32(0.2) + np.float32(0.05) * np.arange(6, dtype=np.float32)
    t = torch.from_numpy(q).float().mul_(1.0 / 255.0)
    t.sub_(torch.from_numpy(mean).view(1, 6, 1, 1)).div_(torch.from_numpy(std).view(1, 6, 1, 1))
    np.testing.assert_array_equal(nrm, t.numpy().reshape(-1))


@pytest.mark.parametrize("name", ["zarr_raw", "zarr"])
def test_truncated_shard_file_is_an_error_not_a_crash(stores, tmp_path, name):
    """The mapped reads (converting read, zstd chunks) meet a damaged shard with StoreError."""
    p = tmp_path / name
    shutil.copytree(stores[name], p)
    shard = sorted(f for f in (p / "data.zarr" / "x" / "c").rglob("*") if f.is_file())[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises((StoreError, EOFError)):
        for _ in loader(p, 4, shuffle=False, num_workers=2):
            pass


@pytest.mark.parametrize("name", ["zarr_raw", "zarr"])
def test_float16_out_mapped_copy_equals_dataset_items(stores, name):
    from scatstore.loaders import convert

    ds = open_dataset(stores[name])
    ld = loader(stores[name], 4, shuffle=True, seed=5, drop_last=False, num_workers=2,
                buffer_size=9, dtype=None)
    ep = ld(0)
    xs, _, idx = _collect(ep)
    for x, ii in zip(xs, idx):
        assert x.dtype == torch.float16
        ref = np.stack([ds[int(i)][0] for i in ii]).reshape(x.shape)
        np.testing.assert_array_equal(x.numpy(), ref)
    convert.select(use_torch=True)  # no library: the preadv path
    try:
        ys, _, idy = _collect(loader(stores[name], 4, shuffle=True, seed=5, drop_last=False,
                                     num_workers=2, buffer_size=9, dtype=None)(0))
    finally:
        convert.select()
    assert all(torch.equal(a, b) for a, b in zip(xs, ys)) and len(xs) == len(ys)


@pytest.mark.parametrize("dtype", [torch.float32, None])
def test_wrap_around_duplicate_filled_on_mapped_reads(stores, dtype):
    """An uneven split pads a rank with its own first sample: the same sample twice in one
    window, the second copy filled from the first (mapped reads write by address)."""
    ds = open_dataset(stores["zarr_raw"])
    assert len(ds) % 2 == 1
    seen_dup = False
    for rank in (0, 1):
        ep = loader(stores["zarr_raw"], 4, shuffle=True, seed=1, drop_last=False, rank=rank,
                    world_size=2, dtype=dtype)(0)
        xs, _, idx = _collect(ep)
        flat = np.concatenate(idx)
        seen_dup |= len(set(flat.tolist())) < len(flat)
        for x, ii in zip(xs, idx):
            ref = np.stack([ds[int(i)][0] for i in ii]).reshape(x.shape)
            np.testing.assert_array_equal(x.float().numpy(), ref.astype(np.float32))
    assert seen_dup
