"""LoRA training on the toy backend: one network in memory (the teacher is it with adapters off), a kohya LoRA with
PeRFlow metadata, --export-delta = the LoRA merged, a resume of a LoRA run is exact."""

import argparse

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from perflow_core.delta_format import state_dict_hash
from training.backends import make_backend
from training.checkpointing import load_checkpoint
from training.toy_model import ToyUNet
from training.train import train


@pytest.fixture
def toy(tiny_toy):
    return tiny_toy


def args(toy, out, *extra):
    base = ["--teacher", str(toy / "teacher.safetensors"), "--data", str(toy / "data.npz"), "--out", str(out)]
    base += ["--batch-size", "8", "--threads", "1", "--solver-steps", "2", "--warmup", "2", "--cpu", "--lr", "1e-3"]
    return [*base, "--lora-rank", "4", *extra]


def test_lora_backend_holds_one_network_and_the_teacher_is_its_base(toy):
    ns = argparse.Namespace(backend="toy", teacher=toy / "teacher.safetensors", data=toy / "data.npz")
    backend = make_backend(argparse.Namespace(**vars(ns), lora_rank=4, lora_alpha=None), torch.device("cpu"))
    assert backend.teacher is backend.student
    trainable = [k for k, p in backend.student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in k for k in trainable)
    assert backend.base_state_dict().keys() == load_file(toy / "teacher.safetensors").keys()
    with torch.no_grad():
        for p in trainable:
            backend.student.get_parameter(p).normal_()  # adapters that change the output
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.9, 0.3]), torch.tensor([1, 10])
        plain = ToyUNet(num_classes=10, in_channels=1, base=8)
        plain.load_state_dict(load_file(toy / "teacher.safetensors"))
        torch.testing.assert_close(backend.teacher_eps(x, t, y), plain(x, t * 1000, y))
        assert not torch.allclose(backend.student_fn(backend.student)(x, t, y), plain(x, t * 1000, y))


def test_lora_run_writes_a_kohya_lora_with_perflow_metadata_and_its_merged_delta(toy, tmp_path):
    out = tmp_path / "run"
    train(args(toy, out, "--steps", "4", "--export-delta", "--sample-teacher-steps", "4"))
    lora = load_file(out / "perflow_lora.safetensors")
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    with safe_open(out / "perflow_lora.safetensors", "pt") as f:
        meta = f.metadata()
    teacher = load_file(toy / "teacher.safetensors")
    assert meta["perflow_format"] == "lora" and meta["parameterization"] == "diff_eps" and meta["num_windows"] == "4"
    assert meta["base_architecture"] == "toy" and meta["base_hash"] == state_dict_hash(teacher)
    assert meta["ss_network_dim"] == "4" and meta["perflow_lora_rank"] == "4" and meta["cfg_mode"] == "sync"
    assert meta["steps_trained"] == "4"
    delta = load_file(out / "perflow_delta.safetensors")
    assert delta and set(delta) <= set(teacher)
    for key, d in delta.items():  # ComfyUI's LoRA merge: alpha / rank * up @ down
        name = "lora_unet_" + key.rsplit(".", 1)[0].replace(".", "_")
        up, down, alpha = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"], lora[f"{name}.alpha"]
        merged = (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(d.shape)
        torch.testing.assert_close(merged, d, atol=1e-6, rtol=1e-5)
    assert any(d.abs().max() > 0 for d in delta.values())
    assert (out / "comparison.png").is_file()
    ck = load_checkpoint(out / "checkpoint.pt")["engine"]
    assert all(".lora_" in k for k in ck["student"])  # the checkpoint keeps the adapters, not the UNet


def test_lora_resume_is_exact(toy, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(args(toy, a, "--steps", "4", "--no-samples"))
    train(args(toy, b, "--steps", "4", "--no-samples", "--stop-at-step", "2"))
    train(args(toy, b, "--steps", "4", "--no-samples", "--resume"))
    la, lb = load_file(a / "perflow_lora.safetensors"), load_file(b / "perflow_lora.safetensors")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
