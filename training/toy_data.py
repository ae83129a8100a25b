"""Toy dataset loader: an npz of uint8 images and integer labels -> float tensors in [-1, 1]."""

from pathlib import Path

import numpy as np
import torch

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "mnist16.npz"


def load_toy_data(path: str | Path = DEFAULT_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """Images float32 N x C x H x W in [-1, 1] and labels int64 N from an npz with `images` and `labels`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"toy data not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy reports a foreign or broken file in many ways
        raise ValueError(
            f"{path}: not a readable .npz ({type(e).__name__}); give an .npz with images and labels"
        ) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single .npy array, not an .npz; save images and labels with np.savez")
    with npz:
        missing = {"images", "labels"} - set(npz.files)
        if missing:
            raise ValueError(f"{path}: missing array(s) {sorted(missing)}; found {npz.files}")
        try:
            images, labels = npz["images"], npz["labels"]
        except Exception as e:  # noqa: BLE001 - a truncated member, a pickled object array, ...
            raise ValueError(f"{path}: its arrays cannot be read ({type(e).__name__}); rebuild the .npz") from None
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 (0..255), got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"{path}: images must be N x H x W or N x C x H x W, got shape {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got {labels.dtype}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: labels must have shape ({images.shape[0]},) to match images, got {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{path}: labels must be non-negative, got minimum {labels.min()}")
    if labels.size and labels.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: labels must be class indices below 2^31, got maximum {labels.max()}")
    x = torch.from_numpy(images).float() / 127.5 - 1.0
    return x, torch.from_numpy(labels.astype(np.int64))
