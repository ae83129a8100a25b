"""Generated training data for the data-pipeline tests: good images of several aspect ratios with captions,
plus one sample of every bad kind the reader must survive, written as tar shards, a folder or a JSONL manifest."""

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ASPECTS = ((64, 64), (64, 96), (96, 64), (48, 112), (80, 64))  # (h, w) of the good images


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16_rgb(h: int, w: int, value: int) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), every channel = value."""
    row = b"\x00" + struct.pack(">H", value) * 3 * w
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(row * h))
        + (_png_chunk(b"IEND", b""))
    )


def png_claiming_size(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb as far as the header goes)."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = b"IHDR" + struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr[4:]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def good_image(i: int) -> tuple[bytes, str]:
    h, w = ASPECTS[i % len(ASPECTS)]
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    fmt, ext = (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"))[i % 3]
    return _encode(Image.fromarray(pixels), fmt), ext


def bad_samples() -> dict[str, tuple[dict[str, bytes], str]]:
    """name -> ({ext: bytes}, what the reader must do: 'skip:<kind>' or 'decode')."""
    red = Image.new("RGB", (80, 64), (255, 0, 0))
    jpeg = _encode(red, "JPEG", quality=95)
    cmyk = _encode(Image.new("CMYK", (80, 64), (0, 255, 255, 0)), "JPEG", quality=95)
    gray16 = _encode(Image.fromarray(np.full((64, 80), 0x8000, dtype=np.uint16)), "PNG")
    pal = Image.new("P", (80, 64), 1)
    pal.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    pal_png = _encode(pal, "PNG", transparency=1)  # index 1 (red) transparent: must come out white
    rgba = Image.new("RGBA", (80, 64), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 40, 64))  # left half opaque blue, right half fully transparent
    rotated = Image.new("RGB", (96, 64), (0, 0, 0))
    rotated.paste((255, 255, 255), (0, 0, 48, 64))  # stored 96 wide, 64 tall, left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    cap = b"a sample"
    return {
        "unreadable": ({"png": b"\x89PNG\r\n\x1a\n this is not a png", "txt": cap}, "skip:unreadable image"),
        "truncated": ({"jpg": jpeg[: len(jpeg) // 2], "txt": cap}, "skip:truncated image"),
        "nocaption": ({"jpg": jpeg}, "skip:missing caption"),
        "emptycaption": ({"jpg": jpeg, "json": json.dumps({"caption": "  "}).encode()}, "skip:missing caption"),
        "tiny": ({"png": _encode(Image.new("RGB", (8, 8)), "PNG"), "txt": cap}, "skip:too small"),
        "bomb": ({"png": png_claiming_size(30000, 30000), "txt": cap}, "skip:too large"),
        "cmyk": ({"jpg": cmyk, "txt": cap}, "decode"),
        "gray16": ({"png": gray16, "txt": cap}, "decode"),
        "rgb16": ({"png": png16_rgb(64, 80, 0x4000), "txt": cap}, "decode"),
        "palette": ({"png": pal_png, "txt": cap}, "decode"),
        "alpha": ({"png": _encode(rgba, "PNG"), "json": json.dumps({"caption": "half blue"}).encode()}, "decode"),
        "exif": ({"jpg": _encode(rotated, "JPEG", quality=95, exif=exif), "txt": cap}, "decode"),
        "small": ({"png": _encode(Image.new("RGB", (48, 40), (0, 255, 0)), "PNG"), "txt": cap}, "decode"),
    }


def samples(n_good: int, with_bad: bool = True) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of n_good good samples (captions "caption <i>") and, if asked, the bad kinds."""
    out = []
    for i in range(n_good):
        data, ext = good_image(i)
        caption = f"caption {i}"
        meta = {"txt": caption.encode()} if i % 2 else {"json": json.dumps({"caption": caption}).encode()}
        out.append((f"s{i:05d}", {ext: data, **meta}))
    if with_bad:
        out += [(f"bad_{name}", files) for name, (files, _) in bad_samples().items()]
    return out


def write_shards(items, folder: Path, per_shard: int) -> str:
    """Tar shards folder/NNNNN.tar (members key.ext, in order); returns the brace pattern of their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for n, start in enumerate(range(0, len(items), per_shard)):
        with tarfile.open(folder / f"{n:05d}.tar", "w") as tar:
            for key, files in items[start : start + per_shard]:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{n:05d}}}.tar")


def write_folder(items, folder: Path) -> Path:
    """key.<image ext> + key.txt (json captions become .txt); samples without a caption get no .txt."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, files in items:
        for ext, data in files.items():
            if ext == "json":
                ext, data = "txt", json.loads(data)["caption"].encode()
            (folder / f"{key}.{ext}").write_bytes(data)
    return folder


def write_jsonl(items, folder: Path) -> Path:
    """images in folder/img/, manifest folder/data.jsonl with relative paths."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for key, files in items:
        ext = next(e for e in files if e not in ("txt", "json"))
        (folder / "img" / f"{key}.{ext}").write_bytes(files[ext])
        rec = {"image": f"img/{key}.{ext}"}
        if "txt" in files:
            rec["caption"] = files["txt"].decode()
        elif "json" in files:
            rec["caption"] = json.loads(files["json"])["caption"]
        lines.append(json.dumps(rec))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"
