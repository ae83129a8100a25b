"""Small class-conditional UNet for the toy backend (eps prediction, or velocity for a flow teacher), with safetensors
save/load (config in metadata)."""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from perflow_core.delta_format import TIME_KINDS


def timestep_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps 0..1000, [B] -> [B, dim] (Transformer / DDPM style)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm + SiLU + conv, twice, with the embedding added in between and a 1x1 skip when channels change."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, cin, H, W], emb [B, emb_dim] -> [B, cout, H, W]."""
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ToyUNet(nn.Module):
    """UNet over 3 resolutions (e.g. 16 -> 8 -> 4); labels == num_classes is the null (unconditional) class."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, base: int = 32):
        super().__init__()
        self.config = {"num_classes": num_classes, "in_channels": in_channels, "base": base}
        self.num_classes = num_classes
        c1, c2, emb_dim = base, 2 * base, 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, emb_dim)
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.mid1 = ResBlock(c2, c2, emb_dim)
        self.mid2 = ResBlock(c2, c2, emb_dim)
        self.up2 = ResBlock(c2 + c2, c2, emb_dim)
        self.up1 = ResBlock(c2 + c1, c1, emb_dim)
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict eps: x [B, C, H, W] (H, W divisible by 4), timestep float [B] in 0..1000, labels int [B]."""
        emb = self.time_mlp(timestep_embedding(timestep, self.config["base"])) + self.class_emb(labels)
        h1 = self.down1(self.conv_in(x), emb)
        h2 = self.down2(self.pool1(F.silu(h1)), emb)
        h = self.mid2(self.mid1(self.pool2(F.silu(h2)), emb), emb)
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h2], dim=1), emb)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def save_toy_model(path: str | Path, model: ToyUNet, extra_metadata: dict | None = None) -> None:
    """Write weights as safetensors; metadata["config"] holds the constructor config as JSON, other values
    from extra_metadata are stored as given (str) or JSON-encoded."""
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()}
    metadata["config"] = json.dumps(model.config)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def toy_model_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of a saved toy model (string values, "config" included)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def toy_time_kind(path: str | Path) -> str:
    """'flow' for a toy teacher trained with --objective flow (velocity at sigma*1000), 'diffusion' for an eps
    teacher on the SD noise table (metadata time_kind absent, as in every teacher before flow); ValueError else."""
    kind = toy_model_metadata(path).get("time_kind", "diffusion")
    if kind not in TIME_KINDS:
        raise ValueError(f"{path}: metadata time_kind {kind!r} is not one of {', '.join(TIME_KINDS)}")
    return kind


def load_toy_model(path: str | Path, device: str | torch.device = "cpu") -> ToyUNet:
    """Rebuild a ToyUNet from its metadata config and load its weights (strict), in eval mode."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"toy model not found: {path}")
    try:
        metadata = toy_model_metadata(path)
    except Exception as e:  # noqa: BLE001 - safetensors reports a foreign or broken file in several ways
        raise ValueError(f"{path}: not a readable .safetensors file ({e}); give a toy model file") from None
    if "config" not in metadata:
        raise ValueError(f"{path}: no 'config' in safetensors metadata; not a toy model file")
    try:
        model = ToyUNet(**json.loads(metadata["config"]))
        model.load_state_dict(load_file(str(path), device=str(device)))
    except Exception as e:  # noqa: BLE001 - a config or tensors of another model
        raise ValueError(f"{path}: not a toy model of this version ({type(e).__name__}: {e})") from None
    return model.to(device).eval()
