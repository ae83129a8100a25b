import json
import pickle
import random
import struct

import pytest
import torch
from safetensors.torch import save_file

from perflow_core.safetensors_file import DeltaFileError, load_tensors, read_header


def _tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g).half(),
        "diffusion_model.input_blocks.0.0.bias": torch.randn(8, generator=g).half(),
        "diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3, generator=g),
        "diffusion_model.out.2.bias": torch.randn(4, generator=g).bfloat16(),
    }


@pytest.fixture
def valid(tmp_path):
    path = tmp_path / "valid.safetensors"
    save_file(_tensors(), str(path), metadata={"perflow_format": "delta"})
    return path


def _raw(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_valid_file_loads(valid):
    header = read_header(valid)
    assert header.metadata == {"perflow_format": "delta"}
    assert header.tensors["diffusion_model.out.2.weight"].shape == (4, 8, 3, 3)
    got = load_tensors(valid)
    for k, t in _tensors().items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t)
    assert set(load_tensors(valid, keep=lambda k: k.endswith("bias"))) == {
        "diffusion_model.input_blocks.0.0.bias",
        "diffusion_model.out.2.bias",
    }


def test_pickle_files_are_refused_without_unpickling(tmp_path, monkeypatch):
    pt = tmp_path / "delta.pt"
    torch.save(_tensors(), pt)

    def forbidden(*a, **k):
        raise AssertionError("the reader must never unpickle")

    for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(mod, name, forbidden)
    with pytest.raises(DeltaFileError, match=r"delta\.pt: pickle-based .* Fix: convert it to \.safetensors"):
        load_tensors(pt)
    for renamed in ["delta.safetensors", "delta.ckpt_renamed"]:  # zip magic found whatever the name
        (tmp_path / renamed).write_bytes(pt.read_bytes())
        with pytest.raises(DeltaFileError, match="pickle/zip"):
            load_tensors(tmp_path / renamed)
    legacy = tmp_path / "legacy.safetensors"
    legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")  # legacy torch.save magic
    with pytest.raises(DeltaFileError, match="pickle/zip"):
        load_tensors(legacy)
    for name in ["x.ckpt", "x.bin", "x.pth"]:
        with pytest.raises(DeltaFileError, match="pickle-based"):
            read_header(tmp_path / name)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "is empty"),
        (b"\x10\x00\x00", "truncated"),
        (struct.pack("<Q", 1 << 40) + b"{}", "truncated"),
        (_raw({"__metadata__": {"a": "b"}}, b""), "no tensors"),
        (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "outside the file"),
        (_raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "byte span"),
        (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12), "bytes after"),
        (_raw({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unsupported dtype"),
        (_raw({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "bad shape"),
        (_raw({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "is not"),
        (_raw({"__metadata__": {"a": 1}}, b""), "__metadata__"),
        (_raw([1, 2], b""), "not a JSON object"),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlaps",
        ),
        (struct.pack("<Q", 5) + b"{'a':", "corrupt safetensors header"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "corrupt safetensors header"),
        (struct.pack("<Q", 20000) + b"[" * 20000, "corrupt safetensors header"),
    ],
)
def test_corrupt_files_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(DeltaFileError, match=match) as e:
        load_tensors(path)
    assert "bad.safetensors" in str(e.value) and "Fix:" in str(e.value)


def test_duplicate_header_keys_are_refused(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    h = f'{{"a": {entry}, "a": {entry}}}'.encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    with pytest.raises(DeltaFileError, match="corrupt"):
        load_tensors(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(tmp_path, value):
    t = _tensors()
    t["diffusion_model.out.2.bias"][2] = value
    path = tmp_path / "nan.safetensors"
    save_file(t, str(path))
    with pytest.raises(DeltaFileError, match="'diffusion_model.out.2.bias' holds NaN or inf"):
        load_tensors(path)


def _variants(data: bytes, rng: random.Random):
    n = struct.unpack("<Q", data[:8])[0]
    for cut in sorted(
        {0, 1, 7, 8, 9, n // 2, n + 7, n + 8, n + 9, len(data) - 1} | {rng.randrange(len(data)) for _ in range(40)}
    ):
        yield f"truncated@{cut}", data[:cut]
    for i in range(400):  # flips spread over the whole file, denser in the 8+n header bytes
        b = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 8])):
            pos = rng.randrange(8 + n) if rng.random() < 0.7 else rng.randrange(len(data))
            b[pos] ^= 1 << rng.randrange(8)
        yield f"flip{i}", bytes(b)
    for length in [0, 1, n - 1, n + 1, len(data), 2**31, 2**63, 2**64 - 1]:
        yield f"length={length}", struct.pack("<Q", length) + data[8:]
    header = json.loads(data[8 : 8 + n])
    keys = [k for k in header if k != "__metadata__"]
    for i in range(60):
        h = json.loads(json.dumps(header))
        entry = h[rng.choice(keys)]
        field = rng.choice(["data_offsets", "shape"])
        entry[field] = [rng.choice([0, 1, 3, 8, 2**31, 2**62, -1, len(data)]) for _ in entry[field]]
        if rng.random() < 0.3:
            entry["dtype"] = rng.choice(["F16", "F32", "F64", "U8", "X", 5])
        yield f"offsets{i}", _raw(h, data[8 + n :])


def test_fuzz_reader_only_raises_the_documented_error(valid, tmp_path):
    data = valid.read_bytes()
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for name, variant in _variants(data, rng):
        path = tmp_path / "fuzz.safetensors"
        path.write_bytes(variant)
        try:
            tensors = load_tensors(path)
        except DeltaFileError:
            outcomes["error"] += 1
        except Exception as e:  # pragma: no cover - the assertion reports it
            raise AssertionError(f"{name}: {type(e).__name__}: {e}") from e
        else:
            outcomes["ok"] += 1
            assert sum(t.numel() * t.element_size() for t in tensors.values()) <= len(variant)
    assert outcomes["error"] > 100 and outcomes["ok"] > 10, outcomes
