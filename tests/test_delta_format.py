import json
import os

import pytest
import torch
from safetensors import safe_open

from perflow_core.delta_format import DeltaMetadata, save_delta, state_dict_hash

HASH = "ab" * 32


def _delta():
    g = torch.Generator().manual_seed(0)
    return {
        "diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3, generator=g).half(),
        "diffusion_model.out.2.bias": torch.randn(4, generator=g),
    }


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "d.safetensors"
    summary = json.dumps({"loss": 0.12, "lr": 1e-5})
    extra = {"cfg_mode": "fixed", "cfg_scale": "3.5", "steps_trained": "1200", "training_summary": summary, "note": "x"}
    save_delta(
        path,
        _delta(),
        parameterization="diff_eps",
        num_windows=4,
        base_architecture="sd15",
        base_hash=HASH,
        extra=extra,
    )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(_delta())
    assert meta["perflow_format"] == "delta" and meta["perflow_format_version"] == "1"
    md = DeltaMetadata.from_metadata(meta)
    assert (md.parameterization, md.num_windows, md.base_architecture, md.base_hash) == ("diff_eps", 4, "sd15", HASH)
    assert md.cfg_mode == "fixed" and md.cfg_scale == 3.5 and md.steps_trained == 1200
    assert md.training_summary == {"loss": 0.12, "lr": 1e-5}
    assert md.extra == {"note": "x"}
    assert DeltaMetadata.from_metadata(md.to_metadata()) == md


@pytest.mark.parametrize(
    "change, match",
    [
        ({"parameterization": "eps"}, "parameterization"),
        ({"num_windows": "0"}, "num_windows"),
        ({"num_windows": "four"}, "num_windows"),
        ({"base_architecture": "sd4"}, "base_architecture"),
        ({"base_architecture": "sd3"}, "base_architecture 'sd3' is a flow-matching model"),
        ({"time_kind": "flow2"}, "time_kind must be one of diffusion, flow"),
        ({"time_kind": "Flow"}, "time_kind must be one of diffusion, flow"),
        ({"flow_shift": "3"}, "flow_shift goes only with time_kind 'flow'"),
        ({"time_kind": "flow", "flow_shift": "3"}, "parameterization 'velocity'"),
        ({"base_hash": "xyz"}, "base_hash"),
        ({"perflow_format_version": "2"}, "perflow_format_version"),
        ({"perflow_format": "lora2"}, "not a PeRFlow delta"),
        ({"training_summary": "{not json"}, "training_summary"),
        ({"steps_trained": "-3"}, "steps_trained"),
    ],
)
def test_metadata_validation(change, match):
    meta = DeltaMetadata("ddim_eps", 4, "sdxl", HASH).to_metadata()
    with pytest.raises(ValueError, match=match):
        DeltaMetadata.from_metadata({**meta, **change})


def test_missing_metadata_key():
    meta = DeltaMetadata("ddim_eps", 4, "sdxl", HASH).to_metadata()
    del meta["base_hash"]
    with pytest.raises(ValueError, match="lacks base_hash"):
        DeltaMetadata.from_metadata(meta)


def test_save_refuses_bad_input_and_leaves_no_file(tmp_path):
    bad = _delta()
    bad["diffusion_model.out.2.bias"][1] = float("nan")
    kw = dict(parameterization="diff_eps", num_windows=4, base_architecture="sd15", base_hash=HASH)
    with pytest.raises(ValueError, match="non-finite"):
        save_delta(tmp_path / "d.safetensors", bad, **kw)
    with pytest.raises(ValueError, match="set by its own field"):
        save_delta(tmp_path / "d.safetensors", _delta(), **kw, extra={"base_hash": HASH})
    with pytest.raises(ValueError, match="num_windows"):
        save_delta(tmp_path / "d.safetensors", _delta(), **{**kw, "num_windows": 0})
    assert os.listdir(tmp_path) == []


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "d.safetensors"
    kw = dict(parameterization="diff_eps", num_windows=4, base_architecture="sd15", base_hash=HASH)
    save_delta(path, _delta(), **kw)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("perflow_core.delta_format.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_delta(path, {"x": torch.ones(3)}, **kw)
    assert os.listdir(tmp_path) == ["d.safetensors"] and path.read_bytes() == before


def test_state_dict_hash_covers_keys_dtypes_shapes_and_bytes():
    sd = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    h = state_dict_hash(sd)
    assert len(h) == 64 and h == state_dict_hash(dict(reversed(list(sd.items()))))
    assert h != state_dict_hash({**sd, "a": sd["a"].reshape(3, 2)})
    assert h != state_dict_hash({**sd, "a": sd["a"].double()})
    assert h != state_dict_hash({"c": sd["a"], "b": sd["b"]})
    assert h != state_dict_hash({**sd, "a": sd["a"] + 1})
    assert h == state_dict_hash({**sd, "a": sd["a"].t().contiguous().t()})


FLOW = {"time_kind": "flow", "flow_shift": "3", "parameterization": "velocity", "base_architecture": "sd3"}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"flow_shift": "nan"}, "flow_shift"),
        ({"flow_shift": "0"}, "flow shift must be from"),
        ({"flow_shift": "1e9"}, "flow shift must be from"),
        ({"flow_shift": "three"}, "flow_shift"),
        ({"flow_shift": None}, "needs flow_shift"),
        ({"parameterization": "diff_eps"}, "parameterization 'velocity'"),
        ({"base_architecture": "sdxl"}, "flow-matching base"),
        ({"time_kind": "diffusion", "flow_shift": None}, "flow-matching model"),
        ({"time_kind": "diffusion"}, "flow_shift goes only with"),
    ],
)
def test_flow_metadata_validation(change, match):
    meta = {**DeltaMetadata("ddim_eps", 4, "sdxl", HASH).to_metadata(), **FLOW, **change}
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        DeltaMetadata.from_metadata(meta)


@pytest.mark.parametrize(("arch", "shift"), [("sd3", "3"), ("flux", "1.15"), ("toy", "1")])
def test_flow_metadata_round_trip(arch, shift):
    meta = {**DeltaMetadata("ddim_eps", 4, "sdxl", HASH).to_metadata(), **FLOW, "base_architecture": arch}
    md = DeltaMetadata.from_metadata({**meta, "flow_shift": shift})
    assert md.is_flow and md.flow_shift == float(shift) and md.base_architecture == arch
    assert md.to_metadata()["time_kind"] == "flow" and md.to_metadata()["flow_shift"] == shift
    assert DeltaMetadata.from_metadata(md.to_metadata()) == md


@pytest.mark.parametrize("kind", [None, "diffusion"])
def test_files_without_a_flow_time_kind_are_the_sd_family(kind):
    meta = DeltaMetadata("diff_eps", 4, "sd15", HASH).to_metadata()
    assert "time_kind" not in meta and "flow_shift" not in meta  # SD files are written as before
    md = DeltaMetadata.from_metadata(meta if kind is None else {**meta, "time_kind": kind})
    assert not md.is_flow and md.flow_shift is None and md.extra == {}


def test_save_delta_writes_flow_metadata(tmp_path):
    path = tmp_path / "flow.safetensors"
    tensors = {"conv_in.weight": torch.randn(8, 1, 3, 3)}
    extra = {"time_kind": "flow", "flow_shift": "3"}
    save_delta(path, tensors, parameterization="velocity", num_windows=4, base_architecture="toy", base_hash=HASH,
               extra=extra)  # fmt: skip
    with safe_open(str(path), "pt") as f:
        md = DeltaMetadata.from_metadata(f.metadata())
    assert md.is_flow and md.flow_shift == 3.0
    with pytest.raises(ValueError, match="parameterization 'velocity'"):
        save_delta(tmp_path / "bad.safetensors", tensors, parameterization="diff_eps", num_windows=4,
                   base_architecture="toy", base_hash=HASH, extra=extra)  # fmt: skip
    assert not (tmp_path / "bad.safetensors").exists()
