"""The comfy backend trains from generated data with every bad kind (needs COMFYUI_PATH): shards, folder and
JSONL, live and from the latent cache, SDXL with buckets; a stopped and resumed run equals an uninterrupted one (also
with buckets and gradient accumulation, and with 2 processes, which split the shards: no sample twice in an epoch)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datagen
import pytest
import torch
from safetensors.torch import load_file

import comfy_env
from training.train import train

REPO = Path(__file__).resolve().parents[1]
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


def test_buckets_with_grad_accumulation_from_shards_resume_exactly(ckpts, tmp_path):
    """Live encoding from shards (no cache), aspect buckets and 2 micro-batches per step (each its own bucket)."""
    data = _data(tmp_path, "shards")
    extra = ["--steps", "3", "--grad-accum", "2", "--buckets", "64x64,96x64,64x96", "--data-workers", "0"]
    train(_argv(ckpts["sd15"], data, tmp_path / "whole", *extra))
    train(_argv(ckpts["sd15"], data, tmp_path / "parts", *extra, "--stop-at-step", "1"))
    train(_argv(ckpts["sd15"], data, tmp_path / "parts", *extra, "--resume"))
    whole = load_file(tmp_path / "whole" / "perflow_delta.safetensors")
    parts = load_file(tmp_path / "parts" / "perflow_delta.safetensors")
    assert whole.keys() == parts.keys() and any(v.abs().max() > 0 for v in whole.values())
    for k in whole:
        assert torch.equal(whole[k], parts[k]), k


def _launch(*argv: str) -> subprocess.CompletedProcess:
    """tests/train_recording.py (training.train recording each process's samples) on 2 CPU processes (gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = REPO / "tests" / "train_recording.py"
    return subprocess.run([*cmd, str(script), *argv, "--cpu"], cwd=REPO, env=env, capture_output=True, text=True)


def _taken(out) -> list[list[dict]]:
    """Per process, the batches it trained on: [{"epoch", "keys"}, ...]."""
    return [[json.loads(line) for line in (out / f"keys-{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


def test_two_processes_split_the_shards_and_resume_exactly(ckpts, tmp_path):
    """2 processes x 2 DataLoader workers over 4 shards of 2 samples, 1 sample per process per step: the first 4
    steps are one epoch, in which every sample is trained on exactly once; a run stopped at step 2 and resumed
    takes the same samples in the same order on each process (into the next epoch) and ends with the same delta."""
    items = datagen.samples(8, with_bad=False)
    data = datagen.write_shards(items, tmp_path / "shards", per_shard=2)
    extra = ["--steps", "6", "--data-workers", "2", "--shuffle-buffer", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for out, more in ((whole, ()), (parts, ("--stop-at-step", "2")), (parts, ("--resume",))):
        proc = _launch(*_argv(ckpts["sd15"], data, out, *extra, *more))
        assert proc.returncode == 0, proc.stderr[-3000:]
    taken = _taken(whole)
    assert [len(t) for t in taken] == [6, 6]
    first_epoch = [k for t in taken for b in t[:4] for k in b["keys"]]
    assert all(b["epoch"] == 0 for t in taken for b in t[:4]) and all(b["epoch"] == 1 for t in taken for b in t[4:])
    assert sorted(k.split(":")[-1] for k in first_epoch) == sorted(key for key, _ in items)
    shards = [{k.rsplit(":", 1)[0] for b in t[:4] for k in b["keys"]} for t in taken]
    assert not shards[0] & shards[1]  # each shard is read by one process
    assert _taken(parts) == taken
    a = load_file(whole / "perflow_delta.safetensors")
    b = load_file(parts / "perflow_delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
