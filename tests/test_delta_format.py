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
        ({"base_architecture": "sd3"}, "base_architecture"),
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
