"""Strict reader for untrusted weight files: validates the safetensors header itself, never unpickles.

It reads the format itself rather than through safetensors' safe_open, because safe_open memory-maps the file:
every page it touches stays resident next to the copied tensors, which doubled the peak for a large file."""

import json
import math
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# safetensors dtype name -> (torch dtype, bytes per element); formats torch cannot check for NaN are left out.
DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_REDOWNLOAD = "re-download the file (the download may be incomplete) or re-export it as .safetensors"
_CONVERT = (
    "convert it to .safetensors in an environment you trust, e.g. "
    "safetensors.torch.save_file(torch.load(path, weights_only=True), 'out.safetensors')"
)


class DeltaFileError(ValueError):
    """A weight file that cannot be used; the message names the file, the problem and the fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = _REDOWNLOAD):
        super().__init__(f"{os.fspath(path)}: {problem}. Fix: {fix}.")


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype name, shape and byte span within the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int = 0  # byte offset of the data section: 8 + header length


def _looks_pickled(head: bytes, tail: bytes) -> bool:
    """torch.save's zip archive, a pickle of protocol 2-5 (0x80 <proto>), or a text-protocol pickle ending in STOP."""
    return (
        head[:4] == b"PK\x03\x04"
        or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
        or (head[:1] in (b"(", b"}", b"]", b"c") and tail == b".")
    )


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key in header")
    return dict(pairs)


def _open_regular_file(path: str | os.PathLike):
    """Open a regular file for reading without ever blocking: a FIFO, socket or device is refused before it is
    opened, and the opened file is checked again (O_NONBLOCK, fstat) in case the path was swapped meanwhile."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                return os.fdopen(fd, "rb")
            os.close(fd)
    except OSError as e:
        raise DeltaFileError(path, f"cannot be read ({e.strerror or e})", "check the path and permissions") from None
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO, socket or device, not a regular file"
    raise DeltaFileError(path, f"is {kind}", "pick a .safetensors weight file")


def _parse_entry(path, name: str, entry, data_size: int) -> TensorInfo:
    if not name or "\x00" in name:
        raise DeltaFileError(path, f"corrupt header: tensor name {name!r} is empty or holds a NUL character")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise DeltaFileError(path, f"corrupt header: entry {name!r} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise DeltaFileError(
            path, f"tensor {name!r} has unsupported dtype {dtype!r}", f"use one of {', '.join(DTYPES)}"
        )
    ints = (
        isinstance(shape, list)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(v) is int and v >= 0 for v in shape + offsets)
    )
    if not ints:
        raise DeltaFileError(path, f"corrupt header: tensor {name!r} has a bad shape or data_offsets")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise DeltaFileError(path, f"truncated or corrupt: tensor {name!r} lies outside the file's data")
    if math.prod(shape) * DTYPES[dtype][1] != end - begin:
        raise DeltaFileError(path, f"corrupt header: tensor {name!r} shape {shape} does not match its byte span")
    return TensorInfo(dtype, tuple(shape), begin, end)


def read_header(path: str | os.PathLike) -> Header:
    """Validate the file's header and layout without reading tensor data; raises DeltaFileError."""
    if os.fspath(path).lower().endswith(PICKLE_SUFFIXES):
        raise DeltaFileError(path, "pickle-based checkpoints are refused (unpickling can run arbitrary code)", _CONVERT)
    with _open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        raw = f.read(n) if 0 < n <= min(size - 8, MAX_HEADER_BYTES) else b""
        f.seek(max(size - 1, 0))
        tail = f.read(1)
    if size == 0:
        raise DeltaFileError(path, "the file is empty")
    try:
        if not raw:
            raise ValueError(f"not a safetensors file, or truncated (header length {n}, file size {size})")
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        if not isinstance(header, dict):
            raise ValueError("corrupt safetensors header (not a JSON object)")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if _looks_pickled(head, tail):
            raise DeltaFileError(path, "this is a pickle/zip (torch.save) file, not safetensors", _CONVERT) from None
        known = raw == b"" or "safetensors" in str(e)
        raise DeltaFileError(path, str(e) if known else f"corrupt safetensors header ({type(e).__name__})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DeltaFileError(path, "corrupt header: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    tensors = {name: _parse_entry(path, name, entry, data_size) for name, entry in header.items()}
    if not tensors:
        raise DeltaFileError(path, "the file holds no tensors", "export the weights again")
    expected = 0  # spans must tile the data section exactly, as safetensors itself requires
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != expected:
            raise DeltaFileError(path, f"corrupt header: tensor {name!r} overlaps another or leaves a gap")
        expected = info.end
    if expected != data_size:
        raise DeltaFileError(path, f"corrupt: {data_size - expected} bytes after the last tensor (size mismatch)")
    return Header(tensors, metadata, 8 + n)


def all_finite(t: torch.Tensor, scratch: torch.Tensor | None = None) -> bool:
    """True when every value is finite. Compared in chunks into one reusable bool buffer, so the check allocates
    nothing per tensor (per-tensor temporaries fragment the heap: +50% peak RSS on a file of 4 MiB tensors)."""
    flat = t.reshape(-1)
    scratch = torch.empty(min(max(flat.numel(), 1), 1 << 20), dtype=torch.bool) if scratch is None else scratch
    for i in range(0, flat.numel(), scratch.numel()):
        part = flat[i : i + scratch.numel()]
        ok = scratch[: part.numel()]
        for compare, other in ((torch.eq, part), (torch.ne, math.inf), (torch.ne, -math.inf)):
            if not compare(part, other, out=ok).all():  # NaN != NaN, so part == part finds NaN
                return False
    return True


def _read_tensor(f, path, key: str, info: TensorInfo, data_start: int) -> torch.Tensor:
    buf = torch.empty(info.end - info.begin, dtype=torch.uint8)
    view, got = memoryview(buf.numpy()), 0
    try:
        f.seek(data_start + info.begin)
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise DeltaFileError(path, f"truncated: tensor {key!r} ends early")
            got += n
    except OSError as e:
        raise DeltaFileError(path, f"reading tensor {key!r} failed ({e.strerror or e})", "check the disk") from None
    return buf.view(DTYPES[info.dtype][0]).reshape(info.shape)


def iter_tensors(
    path: str | os.PathLike, header: Header, keep: Callable[[str], bool] = lambda key: True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time for the kept keys, each checked for NaN/inf; raises DeltaFileError.
    Each tensor is read straight into its own memory (no memory map), so the peak is what the caller keeps plus
    a few MB."""
    scratch = torch.empty(1 << 20, dtype=torch.bool)
    with _open_regular_file(path) as f:
        if os.fstat(f.fileno()).st_size != header.data_start + max((i.end for i in header.tensors.values()), default=0):
            raise DeltaFileError(path, "the file changed size since its header was read", "load it again")
        for key, info in header.tensors.items():
            if not keep(key):
                continue
            t = _read_tensor(f, path, key, info, header.data_start)
            if t.is_floating_point() and not all_finite(t, scratch):
                raise DeltaFileError(path, f"tensor {key!r} holds NaN or inf values", "export the weights again")
            yield key, t


def load_tensors(path: str | os.PathLike, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """Load and check the kept tensors; peak memory is their total plus one tensor's NaN check."""
    return dict(iter_tensors(path, read_header(path), keep))
