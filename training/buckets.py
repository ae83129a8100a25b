"""Aspect-ratio buckets (SDXL paper, section 2.3): every image is resized to cover its nearest bucket and
center-cropped to it; the original size and the crop's top-left corner become SDXL's size conditioning.

Sizes are (height, width) in pixels throughout. Without buckets every image goes to one square bucket of
the training resolution, which is the plain "resize shorter side, center crop" of SD1.5 / SD2.1 training.
"""

import math

# The usual SDXL set spans aspect ratios 1:4 .. 4:1 at about the area of the training resolution squared.
MAX_ASPECT = 4.0


def sdxl_buckets(resolution: int, step: int | None = None) -> list[tuple[int, int]]:
    """(h, w) buckets of area <= resolution^2, sides multiples of `step` (64 at 1024 px, scaled; at least 8),
    aspect ratio within 1:4 .. 4:1: for each width, the tallest height that fits (kohya's and SDXL's 1 MP set)."""
    step = step or max(8, round(64 * resolution / 1024 / 8) * 8)
    area = resolution * resolution
    out = set()
    for w in range(step, area // step + 1, step):
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= MAX_ASPECT:
            out.add((h, w))
    return sorted(out, key=lambda b: b[1] / b[0])


def parse_buckets(spec: str | None, resolution: int) -> list[tuple[int, int]] | None:
    """--buckets: None/"none" (square resize), "sdxl" (sdxl_buckets) or a list "WxH,WxH,..." (multiples of 8)."""
    if spec is None or spec == "none":
        return None
    if spec == "sdxl":
        return sdxl_buckets(resolution)
    buckets = []
    for part in spec.split(","):
        try:
            w, h = (int(v) for v in part.lower().strip().split("x"))
        except ValueError:
            msg = f"--buckets: {part!r} is not WIDTHxHEIGHT; give 'sdxl', 'none' or e.g. 1024x1024,1152x896"
            raise ValueError(msg) from None
        if w <= 0 or h <= 0 or w % 8 or h % 8:
            raise ValueError(f"--buckets: {part!r}: both sides must be positive multiples of 8 (the VAE's factor)")
        buckets.append((h, w))
    return sorted(set(buckets), key=lambda b: b[1] / b[0])


def nearest_bucket(buckets: list[tuple[int, int]], h: int, w: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to h/w in log space (ties: the first in the list)."""
    r = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - r))


def cover_and_crop(h: int, w: int, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized h, w), (crop top, left)): scale so the image covers the bucket, then center-crop to it."""
    bh, bw = bucket
    s = max(bh / h, bw / w)
    nh, nw = max(bh, round(h * s)), max(bw, round(w * s))
    return (nh, nw), ((nh - bh) // 2, (nw - bw) // 2)
