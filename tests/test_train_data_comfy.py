"""The comfy backend trains from generated data with every bad kind (needs COMFYUI_PATH): shards, folder and
JSONL, live and from the latent cache, SDXL with buckets; a stopped and resumed run equals an uninterrupted one."""

import json

import datagen
import pytest
import torch
from safetensors.torch import load_file

import comfy_env
from training.train import train

BAD_SKIPPED = {f"bad_{n}": e[5:] for n, (_, e) in datagen.bad_samples().items() if e != "decode"}


@pytest.fixture(scope="module")
def ckpts():
    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    from checkpoints import checkpoint_path

    return {family: checkpoint_path(family) for family in ("sd15", "sdxl")}


def _data(tmp_path, kind: str) -> str:
    items = datagen.samples(12)
    if kind == "shards":
        return datagen.write_shards(items, tmp_path / "shards", per_shard=4)
    if kind == "folder":
        return str(datagen.write_folder(items, tmp_path / "folder"))
    return str(datagen.write_jsonl(items, tmp_path / "jsonl"))


def _argv(ckpt, data, out, *extra):
    return [
        "--backend", "comfy", "--checkpoint", str(ckpt), "--data", data, "--out", str(out), "--resolution", "64",
        "--batch-size", "2", "--solver-steps", "1", "--no-samples", "--ema-decay", "0", "--threads", "1",
        "--max-pixels", "10000000", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "family,kind,cached,buckets",
    [("sd15", "folder", True, None), ("sd15", "jsonl", False, None), ("sdxl", "shards", True, "64x64,96x64,64x96")],
)
def test_trains_from_each_source(ckpts, tmp_path, family, kind, cached, buckets):
    extra = ["--steps", "2", "--data-workers", "0"]
    extra += ["--cache-latents", str(tmp_path / "cache")] if cached else []
    extra += ["--buckets", buckets] if buckets else []
    summary = train(_argv(ckpts[family], _data(tmp_path, kind), tmp_path / "run", *extra))
    assert summary["step"] == 2
    delta = load_file(tmp_path / "run" / "perflow_delta.safetensors")
    assert all(torch.isfinite(v).all() for v in delta.values()) and any(v.abs().max() > 0 for v in delta.values())
    report = json.loads((tmp_path / "run" / "skipped.json").read_text())
    kinds = {e["kind"] for e in report["samples"]}
    # from the cache: everything the build skipped; live: what the two steps' batches passed over
    assert kinds == set(BAD_SKIPPED.values()) if cached else kinds <= set(BAD_SKIPPED.values())


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(ckpts, tmp_path):
    data = _data(tmp_path, "shards")
    extra = ["--steps", "3", "--data-workers", "2", "--shuffle-buffer", "4"]
    train(_argv(ckpts["sd15"], data, tmp_path / "whole", *extra))
    train(_argv(ckpts["sd15"], data, tmp_path / "parts", *extra, "--stop-at-step", "1"))
    train(_argv(ckpts["sd15"], data, tmp_path / "parts", *extra, "--resume"))
    whole = load_file(tmp_path / "whole" / "perflow_delta.safetensors")
    parts = load_file(tmp_path / "parts" / "perflow_delta.safetensors")
    assert whole.keys() == parts.keys()
    for k in whole:
        assert torch.equal(whole[k], parts[k]), k
