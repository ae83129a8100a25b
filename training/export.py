"""Weight files a training run writes, with the one metadata vocabulary of the project (docs/delta-format.md):
cfg_mode "sync" or "fixed" (+ cfg_scale), steps_trained, training_summary, on top of perflow_core's header."""

import json
from pathlib import Path

import torch

from perflow_core.delta_format import save_delta, state_dict_hash
from training.reflow import ReflowConfig


def training_metadata(rcfg: ReflowConfig, steps_trained: int, summary: dict | None = None) -> dict[str, str]:
    """cfg_mode ("sync" | "fixed"), cfg_scale (only with "fixed"), steps_trained and the optional JSON summary."""
    meta = {"cfg_mode": rcfg.cfg_mode, "steps_trained": str(steps_trained)}
    if rcfg.cfg_mode == "fixed":
        meta["cfg_scale"] = f"{rcfg.cfg_scale:g}"
    if summary is not None:
        meta["training_summary"] = json.dumps(summary, sort_keys=True)
    return meta


def delta_of(weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dW = W - W_base for every base tensor, float32 on the CPU."""
    return {k: (weights[k].detach().float().cpu() - v.detach().float().cpu()).contiguous() for k, v in base.items()}


def write_delta(
    path: str | Path,
    delta: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    *,
    rcfg: ReflowConfig,
    architecture: str,
    steps_trained: int,
    prefix: str = "",
    dtype: torch.dtype = torch.float32,
    summary: dict | None = None,
) -> None:
    """Write a PeRFlow delta (atomically, validated by perflow_core): keys prefix + name, base_hash of the base
    weights under the same names."""
    save_delta(
        path,
        {prefix + k: v.to(dtype) for k, v in delta.items()},
        parameterization=rcfg.parameterization,
        num_windows=rcfg.num_windows,
        base_architecture=architecture,
        base_hash=state_dict_hash({prefix + k: v.detach().cpu() for k, v in base.items()}),
        extra=training_metadata(rcfg, steps_trained, summary),
    )
