"""training/lora.py on the toy UNet: adapters start at zero effect, switching them off gives the base, only the
adapters learn, and the kohya export and the merged delta say the same thing as the adapted network."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from perflow_core.delta_format import state_dict_hash
from training.export import write_lora
from training.lora import (
    TOY_UNET_TARGETS,
    adapter_state_dict,
    adapters_disabled,
    add_adapters,
    base_state_dict,
    kohya_name,
    kohya_state_dict,
    lora_layers,
    lora_product,
    merged_delta,
)
from training.toy_model import ToyUNet


def toy_inputs(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 16, 16, generator=g)
    return x, torch.rand(batch, generator=g) * 1000, torch.randint(0, 11, (batch,), generator=g)


def adapted_toy(rank: int = 4, alpha: float | None = None, randomize: bool = True) -> tuple[ToyUNet, ToyUNet]:
    """(toy UNet with adapters, an untouched copy of its base); with randomize the adapters get random lora_up."""
    torch.manual_seed(0)
    base = ToyUNet()
    model = ToyUNet()
    model.load_state_dict(base.state_dict())
    add_adapters(model, rank, alpha, targets=TOY_UNET_TARGETS)
    if randomize:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                w = layer.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return model, base


def test_adapters_start_with_zero_effect():
    model, base = adapted_toy(randomize=False)
    x, t, y = toy_inputs()
    assert torch.equal(model(x, t, y), base(x, t, y))


def test_layer_set_is_the_published_roles():
    """ResBlock convs, shortcut convs, time-embedding projections and the strided down convs; nothing else."""
    model, _ = adapted_toy(randomize=False)
    names = set(lora_layers(model))
    blocks = ("down1", "down2", "mid1", "mid2", "up2", "up1")
    expected = {f"{b}.{p}" for b in blocks for p in ("conv1", "conv2", "emb")}
    expected |= {"down2.skip", "up2.skip", "up1.skip", "pool1", "pool2"}  # down1/mid have an Identity skip
    assert names == expected


def test_disabling_gives_the_base_and_restores_the_adapters():
    model, base = adapted_toy()
    x, t, y = toy_inputs()
    student = model(x, t, y)
    assert not torch.allclose(student, base(x, t, y), atol=1e-4)
    with adapters_disabled(model):
        assert torch.equal(model(x, t, y), base(x, t, y))
    assert torch.equal(model(x, t, y), student)
    assert all(p.requires_grad for p in adapter_state_dict(model).values() if isinstance(p, torch.nn.Parameter))
    assert {k for k, p in model.named_parameters() if p.requires_grad} == set(adapter_state_dict(model))


def test_gradients_reach_only_the_adapters():
    model, _ = adapted_toy()
    x, t, y = toy_inputs()
    with adapters_disabled(model), torch.no_grad():
        target = model(x, t, y)  # the teacher: same network, adapters off
    ((model(x, t, y) - target - 0.1) ** 2).mean().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    adapters = set(adapter_state_dict(model))
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in adapters)
    assert all(g is None for k, g in grads.items() if k not in adapters)
    assert all(not p.requires_grad for k, p in model.named_parameters() if k not in adapters)


def test_base_state_dict_has_the_original_keys_and_values():
    model, base = adapted_toy()
    ours = base_state_dict(model)
    assert list(ours) == list(base.state_dict())
    assert state_dict_hash(ours) == state_dict_hash(base.state_dict())


@pytest.mark.parametrize("alpha", [None, 1.0, 16.0])
def test_merged_delta_reproduces_the_adapted_network(alpha):
    """base + merged dW, loaded into a plain ToyUNet, computes what the adapted network computes."""
    model, base = adapted_toy(rank=3, alpha=alpha)
    x, t, y = toy_inputs()
    delta = merged_delta(model)
    assert set(delta) == {f"{n}.weight" for n in lora_layers(model)}
    merged = ToyUNet()
    merged.load_state_dict({k: v + delta.get(k, 0) for k, v in base.state_dict().items()})
    torch.testing.assert_close(merged(x, t, y), model(x, t, y), atol=1e-5, rtol=1e-5)


def test_kohya_export_round_trips_to_the_merged_delta():
    """ComfyUI's LoRA arithmetic on the kohya tensors (alpha / rank * up @ down) gives merged_delta exactly."""
    model, _ = adapted_toy(rank=4, alpha=8.0)
    delta = merged_delta(model, key_prefix="diffusion_model.")
    kohya = kohya_state_dict(model, key_prefix="diffusion_model.", dtype=torch.float32)
    assert len(kohya) == 3 * len(delta)
    for key, dw in delta.items():
        n = kohya_name(key)
        up, down, alpha = kohya[f"{n}.lora_up.weight"], kohya[f"{n}.lora_down.weight"], kohya[f"{n}.alpha"]
        assert alpha.item() == 8.0 and down.shape[0] == 4
        assert up.ndim == down.ndim == dw.ndim and (dw.ndim == 2 or up.shape[2:] == (1, 1))
        recon = (alpha.item() / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(dw.shape)
        torch.testing.assert_close(recon, dw, atol=0, rtol=0)


def test_merged_delta_in_half_precision_is_the_rounded_float32_delta():
    model, _ = adapted_toy()
    full, half = merged_delta(model), merged_delta(model, dtype=torch.float16)
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], full[k].half()) for k in full)


def test_an_ema_copy_of_the_adapters_is_exported_instead_of_the_live_ones():
    model, _ = adapted_toy()
    ema = {k: v * 0.5 if ".lora_B." in k else v for k, v in adapter_state_dict(model).items()}
    live, halved = merged_delta(model), merged_delta(model, weights=ema)
    for k in live:
        torch.testing.assert_close(halved[k], live[k] * 0.5)


def test_adapters_train_in_float32_on_a_half_precision_base():
    torch.manual_seed(0)
    model = ToyUNet().half()
    add_adapters(model, 2, targets=TOY_UNET_TARGETS)
    assert {v.dtype for v in adapter_state_dict(model).values()} == {torch.float32}
    assert {v.dtype for v in base_state_dict(model).values()} == {torch.float16}


@pytest.mark.parametrize(
    ("rank", "alpha", "targets"),
    [(0, None, TOY_UNET_TARGETS), (2.5, None, TOY_UNET_TARGETS), (True, None, TOY_UNET_TARGETS),
     (4, float("nan"), TOY_UNET_TARGETS), (4, -1.0, TOY_UNET_TARGETS), (4, None, (r"\.no_such_layer$",))],
)  # fmt: skip
def test_bad_settings_are_refused(rank, alpha, targets):
    with pytest.raises(ValueError):
        add_adapters(ToyUNet(), rank, alpha, targets=targets)


def test_adapters_are_added_once():
    model, _ = adapted_toy(randomize=False)
    with pytest.raises(ValueError, match="already"):
        add_adapters(model, 4, targets=TOY_UNET_TARGETS)


def test_write_lora_carries_the_vocabulary_and_the_rank(tmp_path):
    model, base = adapted_toy(rank=4, alpha=2.0)
    kohya = kohya_state_dict(model)
    meta = {
        "parameterization": "diff_eps",
        "num_windows": "4",
        "base_architecture": "toy",
        "base_hash": state_dict_hash(base.state_dict()),
        "cfg_mode": "fixed",
        "cfg_scale": "4.5",
        "steps_trained": "30",
        "training_summary": json.dumps({"loss": 0.1}),
    }
    path = tmp_path / "lora.safetensors"
    write_lora(path, kohya, meta)
    with safe_open(path, "pt") as f:
        header = f.metadata()
    assert header == meta | {
        "perflow_format": "lora",
        "perflow_format_version": "1",
        "ss_network_dim": "4",
        "ss_network_alpha": "2",
        "perflow_lora_rank": "4",
    }
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in kohya.items())
    assert {v.dtype for k, v in loaded.items() if not k.endswith(".alpha")} == {torch.float16}


@pytest.mark.parametrize(
    "change",
    [
        {"parameterization": "eps"},
        {"num_windows": "４"},
        {"num_windows": "0"},
        {"base_architecture": "sd3"},
        {"base_hash": "abc"},
        {"cfg_mode": "cfg_sync"},
        {"cfg_mode": "sync", "cfg_scale": "4"},
        {"cfg_mode": "fixed"},
        {"cfg_mode": "fixed", "cfg_scale": "inf"},
        {"steps_trained": "1_0"},
        {"training_summary": "[1]"},
        {"ss_network_dim": "4"},
        {"base_hash": None},
    ],
)
def test_write_lora_refuses_metadata_outside_the_vocabulary(tmp_path, change):
    model, base = adapted_toy(rank=2)
    meta = {
        "parameterization": "velocity",
        "num_windows": "4",
        "base_architecture": "toy",
        "base_hash": state_dict_hash(base.state_dict()),
        "cfg_mode": "sync",
    }
    meta = {k: v for k, v in (meta | change).items() if v is not None}
    path = tmp_path / "lora.safetensors"
    with pytest.raises(ValueError):
        write_lora(path, kohya_state_dict(model), meta)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_write_lora_refuses_tensors_that_are_not_a_lora(tmp_path):
    model, _ = adapted_toy(rank=2)
    good = kohya_state_dict(model, dtype=torch.float32)
    name = next(iter(good)).partition(".")[0]
    overflow = dict(good)
    overflow[f"{name}.lora_up.weight"] = good[f"{name}.lora_up.weight"] * 1e6  # fp16: inf
    bad = [
        {},
        {k: v for k, v in good.items() if k != f"{name}.alpha"},
        {k: v for k, v in good.items() if k != f"{name}.lora_up.weight"},
        good | {f"{name}.lora_up.weight": good[f"{name}.lora_up.weight"][:, :1]},
        good | {"diffusion_model.x.weight": torch.zeros(2)},
        good | {f"{name}.diff_b": torch.zeros(2, dtype=torch.int32)},
        good | {f"{name}.diff_b": torch.full((2,), float("nan"))},
        {k: v.half() for k, v in overflow.items()},
    ]
    for tensors in bad:
        with pytest.raises(ValueError):
            write_lora(tmp_path / "x.safetensors", tensors, {})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("width", "arch"), [(768, "sdxl"), (2048, "sd15"), (1024, "toy")])
def test_write_lora_refuses_an_architecture_the_shapes_contradict(tmp_path, width, arch):
    n = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    tensors = {
        f"{n}.lora_down.weight": torch.zeros(4, width),
        f"{n}.lora_up.weight": torch.zeros(640, 4),
        f"{n}.alpha": torch.tensor(4.0),
    }
    meta = {"parameterization": "ddim_eps", "num_windows": "4", "base_architecture": arch, "base_hash": "0" * 64}
    with pytest.raises(ValueError, match="attn2.to_k"):
        write_lora(tmp_path / "x.safetensors", tensors, meta)
    right = {768: "sd15", 1024: "sd21", 2048: "sdxl"}[width]
    write_lora(tmp_path / "x.safetensors", tensors, meta | {"base_architecture": right})


def test_lora_product_is_comfyui_arithmetic():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(6, 2, 1, 1, generator=g), torch.randn(2, 3, 3, 3, generator=g)
    expected = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * (5.0 / 2)
    torch.testing.assert_close(lora_product(up, down, 5.0, torch.Size((6, 3, 3, 3))), expected)


@pytest.mark.parametrize("text", ["1e400", "-1e999"])
def test_write_lora_refuses_a_cfg_scale_that_reads_as_infinite(tmp_path, text):
    n = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    tensors = {
        f"{n}.lora_down.weight": torch.zeros(4, 768),
        f"{n}.lora_up.weight": torch.zeros(640, 4),
        f"{n}.alpha": torch.tensor(4.0),
    }
    meta = {"parameterization": "ddim_eps", "num_windows": "4", "base_architecture": "sd15", "base_hash": "0" * 64}
    with pytest.raises(ValueError, match="finite"):
        write_lora(tmp_path / "x.safetensors", tensors, meta | {"cfg_mode": "fixed", "cfg_scale": text})
    assert not list(tmp_path.iterdir())
    write_lora(tmp_path / "x.safetensors", tensors, meta | {"cfg_mode": "fixed", "cfg_scale": "4.5"})
