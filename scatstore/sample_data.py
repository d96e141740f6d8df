"""Real photographs and textures that ship inside scikit-image (no download at run time).

Only the images bundled in the scikit-image wheel are listed: the others in ``skimage.data``
are fetched from the network by pooch, which this project never does at run time.
"""
from __future__ import annotations

import numpy as np

# name -> kind. "photo": natural RGB/grey photographs; "texture": Brodatz-like textures.
SHIPPED_IMAGES: dict[str, str] = {
    "astronaut": "photo",
    "camera": "photo",
    "coffee": "photo",
    "chelsea": "photo",
    "rocket": "photo",
    "hubble_deep_field": "photo",
    "immunohistochemistry": "photo",
    "stereo_motorcycle": "photo",
    "colorwheel": "photo",
    "coins": "photo",
    "clock": "photo",
    "moon": "photo",
    "page": "photo",
    "text": "photo",
    "cell": "photo",
    "retina": "photo",
    "brick": "texture",
    "grass": "texture",
    "gravel": "texture",
}

TEXTURES = tuple(n for n, k in SHIPPED_IMAGES.items() if k == "texture")
PHOTOS = tuple(n for n, k in SHIPPED_IMAGES.items() if k == "photo")


def load_image(name: str, rgb: bool = True) -> np.ndarray:
    """Return a shipped ``skimage.data`` image as uint8, (H, W, 3) when ``rgb`` else as stored."""
    if name not in SHIPPED_IMAGES:
        raise KeyError(f"{name!r} is not a scikit-image image shipped with the wheel; "
                       f"choose from {sorted(SHIPPED_IMAGES)}")
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle returns (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8) if img.dtype.kind == "f" \
            else img.astype(np.uint8)
    if rgb:
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        elif img.shape[2] == 4:
            img = img[:, :, :3]
    return np.ascontiguousarray(img)


def load_faces(n: int | None = None) -> np.ndarray:
    """``skimage.data.lfw_subset()``: 25x25 grey faces (first 100) and non-faces, as uint8."""
    import skimage.data

    faces = skimage.data.lfw_subset()
    if n is not None:
        faces = faces[:n]
    return (np.clip(faces, 0, 1) * 255).round().astype(np.uint8)
