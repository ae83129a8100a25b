"""Weight files: every bad file raises perflow_core.DeltaFileError with the reason, and nothing blocks."""

import json
import os
import pickle
import struct
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import perflow_core
from perflow_core import DeltaFileError, read_weight_file
from perflow_core.delta_format import DeltaMetadata, save_delta
from perflow_core.delta_keys import KeyPlan, mismatch_error

HASH = "cd" * 32
META = DeltaMetadata("diff_eps", 4, "sd15", HASH).to_metadata()
SD15_TO_K = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def small_delta() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {SD15_TO_K: torch.randn(8, 768, generator=g) * 1e-3, "diffusion_model.out.2.bias": torch.zeros(4)}


def raw_file(path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def read_in_thread(path, seconds: float = 10.0):
    """read_weight_file(path) in a daemon thread; fails the test if it has not returned within `seconds`."""
    result = {}

    def run():
        try:
            result["value"] = read_weight_file(path)
        except Exception as e:  # noqa: BLE001 (handed to the test)
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"reading {path} blocked"
    return result


def test_public_api_at_the_package_root():
    assert perflow_core.read_weight_file is read_weight_file
    assert issubclass(perflow_core.DeltaFileError, ValueError)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_named_safetensors_is_refused_at_once(tmp_path):
    fifo = tmp_path / "delta.safetensors"
    os.mkfifo(fifo)
    result = read_in_thread(fifo)
    assert isinstance(result.get("error"), DeltaFileError) and "FIFO" in str(result["error"])


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null"])
def test_a_device_named_safetensors_is_refused(tmp_path, target):
    if not os.path.exists(target):
        pytest.skip(f"{target} does not exist here")
    link = tmp_path / "delta.safetensors"
    link.symlink_to(target)
    result = read_in_thread(link)
    assert isinstance(result.get("error"), DeltaFileError) and "not a regular file" in str(result["error"])


def test_a_folder_and_a_missing_file_are_refused(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(DeltaFileError, match=r"d\.safetensors: is a folder"):
        read_weight_file(tmp_path / "d.safetensors")
    with pytest.raises(DeltaFileError, match="cannot be read"):
        read_weight_file(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_pickle_under_a_safetensors_name_is_reported_as_a_pickle(tmp_path, protocol):
    path = tmp_path / "delta.safetensors"
    path.write_bytes(pickle.dumps({SD15_TO_K: [0.0, 1.0]}, protocol=protocol))
    with pytest.raises(DeltaFileError, match="this is a pickle"):
        read_weight_file(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_integer_and_bool_tensors_are_refused_in_a_delta(tmp_path, dtype):
    tensors = {**small_delta(), "diffusion_model.out.2.bias": torch.ones(4, dtype=dtype)}
    save_file(tensors, str(tmp_path / "d.safetensors"), META)
    with pytest.raises(DeltaFileError, match="floating-point"):
        read_weight_file(tmp_path / "d.safetensors")
    save_file(tensors, str(tmp_path / "m.safetensors"))  # a diffusers/LDM file without metadata too
    with pytest.raises(DeltaFileError, match="floating-point"):
        read_weight_file(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="floating-point"):
        save_delta(tmp_path / "w.safetensors", tensors, parameterization="diff_eps", num_windows=4,
                   base_architecture="sd15", base_hash=HASH)  # fmt: skip


def test_a_kohya_lora_may_keep_an_integer_alpha(tmp_path):
    lora = {
        "lora_unet_a_attn2_to_k.lora_down.weight": torch.ones(2, 768),
        "lora_unet_a_attn2_to_k.lora_up.weight": torch.ones(8, 2),
        "lora_unet_a_attn2_to_k.alpha": torch.tensor(2),
    }
    save_file(lora, str(tmp_path / "l.safetensors"))
    assert read_weight_file(tmp_path / "l.safetensors").format == "kohya_lora"
    save_file({**lora, "lora_unet_a_attn2_to_k.alpha": torch.tensor(True)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(DeltaFileError, match="BOOL"):
        read_weight_file(tmp_path / "b.safetensors")


def test_a_file_of_only_zero_size_tensors_is_refused(tmp_path):
    save_file({SD15_TO_K: torch.zeros(0, 768), "diffusion_model.x": torch.zeros(0)}, str(tmp_path / "z.safetensors"))
    with pytest.raises(DeltaFileError, match="empty"):
        read_weight_file(tmp_path / "z.safetensors")


@pytest.mark.parametrize("name", ["", "diffusion_model.a\x00.weight", "\x00"])
def test_empty_names_and_names_with_nul_are_refused(tmp_path, name):
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    other = {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}
    raw_file(tmp_path / "n.safetensors", {name: entry, "diffusion_model.b": other}, b"\0" * 8)
    with pytest.raises(DeltaFileError, match="empty or holds a NUL"):
        read_weight_file(tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match="without NUL"):
        save_delta(tmp_path / "w.safetensors", {name: torch.ones(1)}, parameterization="diff_eps", num_windows=4,
                   base_architecture="toy", base_hash=HASH)  # fmt: skip


def sdxl_delta() -> dict[str, torch.Tensor]:
    return {SD15_TO_K.replace("input_blocks.1", "input_blocks.4"): torch.zeros(8, 2048)}


def test_the_architecture_comes_from_the_shapes_not_the_metadata(tmp_path):
    save_file(sdxl_delta(), str(tmp_path / "d.safetensors"), META)  # metadata says sd15, shapes are SDXL
    with pytest.raises(DeltaFileError, match=r"metadata says base_architecture 'sd15' .* SDXL's"):
        read_weight_file(tmp_path / "d.safetensors")
    save_file(sdxl_delta(), str(tmp_path / "plain.safetensors"))
    assert read_weight_file(tmp_path / "plain.safetensors").architecture == "sdxl"


def test_a_same_architecture_mismatch_does_not_blame_the_architecture():
    plan = KeyPlan(pairs={"a": "b"}, mismatched=[("k", (320, 9, 3, 3), (320, 4, 3, 3))])
    text = str(mismatch_error("x.safetensors", plan, "sd15", "sd15"))
    assert "both SD1.5" in text and "looks like" not in text
    text = str(mismatch_error("x.safetensors", plan, "sdxl", "sd15"))
    assert "looks like SDXL, the model is SD1.5" in text


@pytest.mark.parametrize(
    "change, match",
    [
        ({"base_architecture": "sdxl"}, r"tensor shapes are SD1\.5's"),
        ({"base_architecture": "toy"}, r"tensor shapes are SD1\.5's"),
        ({"num_windows": True}, "num_windows"),
        ({"num_windows": 0}, "num_windows"),
        ({"num_windows": 17}, "num_windows"),
        ({"parameterization": "eps"}, "parameterization"),
        ({"extra": {"cfg_mode": "cfg3.5"}}, "cfg_mode"),
        ({"extra": {"cfg_mode": "sync", "cfg_scale": "7"}}, "cfg_scale goes only with"),
        ({"extra": {"cfg_mode": "fixed", "cfg_scale": "nan"}}, "cfg_scale"),
        ({"extra": {"steps_trained": "٤"}}, "steps_trained"),
    ],
)
def test_save_delta_refuses_metadata_that_contradicts_the_tensors_or_the_vocabulary(tmp_path, change, match):
    kw = dict(parameterization="diff_eps", num_windows=4, base_architecture="sd15", base_hash=HASH) | change
    with pytest.raises(ValueError, match=match):
        save_delta(tmp_path / "d.safetensors", small_delta(), **kw)
    assert os.listdir(tmp_path) == []


def test_save_delta_refuses_zero_size_tensors(tmp_path):
    with pytest.raises(ValueError, match="at least one value"):
        save_delta(tmp_path / "d.safetensors", {**small_delta(), "diffusion_model.e": torch.zeros(0)},
                   parameterization="diff_eps", num_windows=4, base_architecture="sd15", base_hash=HASH)  # fmt: skip


@pytest.mark.parametrize(
    "legacy, mode, scale", [("cfg_sync", "sync", None), ("cfg_fixed 4.5", "fixed", 4.5), ("sync", "sync", None)]
)
def test_legacy_cfg_mode_values_are_read_and_written_in_the_contract_vocabulary(tmp_path, legacy, mode, scale):
    save_file(small_delta(), str(tmp_path / "old.safetensors"), {**META, "cfg_mode": legacy})
    md = read_weight_file(tmp_path / "old.safetensors").metadata
    assert (md.cfg_mode, md.cfg_scale) == (mode, scale)
    save_delta(tmp_path / "new.safetensors", small_delta(), parameterization="diff_eps", num_windows=4,
               base_architecture="sd15", base_hash=HASH, extra={"cfg_mode": legacy})  # fmt: skip
    written = read_weight_file(tmp_path / "new.safetensors").metadata.to_metadata()
    assert written["cfg_mode"] == mode and written.get("cfg_scale") == (None if scale is None else repr(scale))


def test_lora_metadata_gives_parameterization_and_windows(tmp_path):
    lora = {
        "lora_unet_a_attn2_to_k.lora_down.weight": torch.ones(2, 1024),
        "lora_unet_a_attn2_to_k.lora_up.weight": torch.ones(8, 2),
        "lora_unet_a_attn2_to_k.alpha": torch.tensor(2.0),
    }
    meta = DeltaMetadata("velocity", 6, "sd21", HASH, format="lora").to_metadata()
    meta |= {"ss_network_dim": "2", "ss_network_alpha": "2.0", "perflow_lora_rank": "2"}
    save_file(lora, str(tmp_path / "l.safetensors"), meta)
    wf = read_weight_file(tmp_path / "l.safetensors")
    assert wf.format == "kohya_lora" and wf.architecture == "sd21"
    assert (wf.metadata.parameterization, wf.metadata.num_windows, wf.metadata.format) == ("velocity", 6, "lora")
    assert wf.metadata.extra["perflow_lora_rank"] == "2"
    save_file(lora, str(tmp_path / "bad.safetensors"), {**meta, "num_windows": "４"})
    with pytest.raises(DeltaFileError, match="num_windows"):
        read_weight_file(tmp_path / "bad.safetensors")
    save_file(small_delta(), str(tmp_path / "notkohya.safetensors"), meta)
    with pytest.raises(DeltaFileError, match="lora_unet_"):
        read_weight_file(tmp_path / "notkohya.safetensors")


def test_unknown_perflow_format_is_refused(tmp_path):
    save_file(small_delta(), str(tmp_path / "d.safetensors"), {**META, "perflow_format": "delta2"})
    with pytest.raises(DeltaFileError, match="delta2"):
        read_weight_file(tmp_path / "d.safetensors")


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "d.safetensors"
    save_delta(path, small_delta(), parameterization="diff_eps", num_windows=4, base_architecture="sd15",
               base_hash=HASH)  # fmt: skip
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damaged_file_raises_delta_file_error_or_reads_finite(tmp_path, valid_bytes, data):
    raw = bytearray(valid_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(raw[:cut]))
    try:
        wf = read_weight_file(path)
    except DeltaFileError:
        return
    assert all(t.is_floating_point() and torch.isfinite(t).all() for t in wf.tensors.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_non_finite_value_past_the_first_check_chunk_is_found(tmp_path, bad, dtype):
    t = torch.zeros((1 << 20) * 2 + 5, dtype=dtype)
    t[-1] = bad
    save_file({"diffusion_model.x.weight": t}, str(tmp_path / "d.safetensors"))
    with pytest.raises(DeltaFileError, match="NaN or inf"):
        read_weight_file(tmp_path / "d.safetensors")


def test_a_read_error_midway_is_a_delta_file_error(tmp_path, monkeypatch):
    save_delta(tmp_path / "d.safetensors", small_delta(), parameterization="diff_eps", num_windows=4,
               base_architecture="sd15", base_hash=HASH)  # fmt: skip
    real_open = os.fdopen

    class FailingReads:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readinto(self, view):
            raise OSError(5, "Input/output error")

    calls = []

    def fdopen(fd, mode):
        calls.append(fd)
        f = real_open(fd, mode)
        return f if len(calls) == 1 else FailingReads(f)  # the header reads fine, the data does not

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(DeltaFileError, match="Input/output error"):
        read_weight_file(tmp_path / "d.safetensors")
