"""The files training writes, with one metadata vocabulary (docs/delta-format.md, CONTRACTS.md): deltas and kohya
LoRAs, cfg_mode "sync" or "fixed" (+ cfg_scale), steps_trained, training_summary, on top of perflow_core's header."""

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from perflow_core.atomic_file import atomic_path
from perflow_core.delta_format import FORMAT_VERSION, DeltaMetadata, save_delta, state_dict_hash
from perflow_core.delta_keys import guess_architecture
from perflow_core.number_parsing import finite
from training.reflow import CFG_MODES, ReflowConfig

LORA_FORMAT = "lora"
# What a PeRFlow LoRA says about its training: PERFLOW_KEYS come together or not at all (a LoRA extracted from a
# delta without metadata is a plain kohya LoRA), TRAINING_KEYS only with them; training.extract_lora adds the
# relative error of its truncation.
PERFLOW_KEYS = ("parameterization", "num_windows", "base_architecture", "base_hash")
FLOW_KEYS = ("time_kind", "flow_shift")  # a flow-matching base's windows (docs/delta-format.md)
TRAINING_KEYS = ("cfg_mode", "cfg_scale", "steps_trained", "training_summary")
EXTRACTION_KEYS = ("perflow_lora_relative_error",)
_KOHYA_KEY = re.compile(r"lora_unet_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha|diff|diff_b)")
_DECIMAL = re.compile(r"[0-9]+")  # ASCII only, matched with fullmatch
_FLOAT = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def lora_metadata(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The header of a LoRA file: the caller's PeRFlow entries checked against the vocabulary, perflow_format
    'lora' where they are present, and the ranks read from the tensors (kohya's ss_network_dim / ss_network_alpha,
    'Dynamic' when they differ between layers as in kohya's resize_lora; perflow_lora_rank = the largest rank,
    perflow_lora_ranks = {module: rank} when they differ)."""
    known = PERFLOW_KEYS + FLOW_KEYS + TRAINING_KEYS + EXTRACTION_KEYS
    unknown = set(metadata) - set(known)
    if unknown:
        raise ValueError(f"unknown LoRA metadata {sorted(unknown)}; known: {', '.join(known)}")
    if any(not isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"LoRA metadata values must be strings, got {metadata!r}")
    given = [k for k in PERFLOW_KEYS if k in metadata]
    meta = {}
    if given:
        missing = [k for k in PERFLOW_KEYS if k not in metadata]
        if missing:
            raise ValueError(f"LoRA metadata has {', '.join(given)} but lacks {', '.join(missing)}")
        if not _DECIMAL.fullmatch(metadata["num_windows"]):
            raise ValueError(f"num_windows must be a decimal integer, got {metadata['num_windows']!r}")
        if "flow_shift" in metadata and not _FLOAT.fullmatch(metadata["flow_shift"]):
            raise ValueError(f"flow_shift must be a decimal number, got {metadata['flow_shift']!r}")
        DeltaMetadata(  # validates parameterization, num_windows, base_architecture, base_hash, time_kind, flow_shift
            metadata["parameterization"],
            int(metadata["num_windows"]),
            metadata["base_architecture"],
            metadata["base_hash"],
            time_kind=metadata.get("time_kind", ""),
            flow_shift=float(metadata["flow_shift"]) if "flow_shift" in metadata else None,
        )
        shapes_say = guess_architecture({k: tuple(t.shape) for k, t in tensors.items()})
        if shapes_say != "unknown" and shapes_say != metadata["base_architecture"]:
            raise ValueError(
                f"metadata says base_architecture {metadata['base_architecture']!r}, but the attn2.to_k input width "
                f"of the tensors is {shapes_say}'s"
            )
        meta = {"perflow_format": LORA_FORMAT, "perflow_format_version": FORMAT_VERSION}
    elif set(metadata) & set(TRAINING_KEYS + FLOW_KEYS):
        raise ValueError(f"LoRA metadata {sorted(metadata)} needs {', '.join(PERFLOW_KEYS)} as well")
    _check_entries(metadata)
    ranks, alphas = {}, {}
    for key, t in tensors.items():
        name, _, part = key.partition(".")
        if part == "lora_down.weight":
            ranks[name] = t.shape[0]
        elif part == "alpha":
            alphas[name] = t.item()
    if ranks:
        dim = max(ranks.values())
        uniform_rank, uniform_alpha = len(set(ranks.values())) == 1, len(set(alphas.values())) == 1
        meta["ss_network_dim"] = str(dim) if uniform_rank else "Dynamic"
        meta["ss_network_alpha"] = f"{next(iter(alphas.values())):g}" if uniform_alpha else "Dynamic"
        meta["perflow_lora_rank"] = str(dim)
        if not uniform_rank:
            meta["perflow_lora_ranks"] = json.dumps(dict(sorted(ranks.items())))
    return meta | metadata


def _check_entries(metadata: dict[str, str]) -> None:
    mode = metadata.get("cfg_mode")
    if mode is not None and mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {', '.join(CFG_MODES)}, got {mode!r}")
    if ("cfg_scale" in metadata) != (mode == "fixed"):
        raise ValueError("cfg_scale is written with cfg_mode 'fixed' and only then")
    for key, pattern in (("cfg_scale", _FLOAT), ("perflow_lora_relative_error", _FLOAT), ("steps_trained", _DECIMAL)):
        if key in metadata and not pattern.fullmatch(metadata[key]):
            raise ValueError(f"{key} must be a decimal number, got {metadata[key]!r}")
        if key in metadata and pattern is _FLOAT:
            finite(float(metadata[key]), key, metadata[key])  # '1e400' matches the pattern but the reader refuses inf
    if "training_summary" in metadata:
        try:
            summary = json.loads(metadata["training_summary"])
        except json.JSONDecodeError as e:
            raise ValueError(f"training_summary is not valid JSON: {e}") from None
        if not isinstance(summary, dict):
            raise ValueError("training_summary must be a JSON object")


def _check_lora_tensors(tensors: dict[str, torch.Tensor]) -> None:
    if not tensors:
        raise ValueError("a LoRA needs at least one tensor")
    for key, t in tensors.items():
        if not isinstance(key, str) or not _KOHYA_KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not a kohya LoRA key (lora_unet_<name>.lora_down.weight/lora_up.weight/...)")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{key}: a LoRA tensor must be a floating-point torch.Tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"{key}: holds NaN or inf (out of the range of {t.dtype}?); refusing to save it")
    for name in {key.partition(".")[0] for key in tensors if ".lora_" in key}:
        down, up = tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight")
        alpha = tensors.get(f"{name}.alpha")
        if down is None or up is None or alpha is None or alpha.numel() != 1 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{name}: needs lora_down and lora_up of one rank and a scalar alpha")


def write_lora(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a kohya-format LoRA (`lora_unet_*` keys) atomically, its header from lora_metadata()."""
    _check_lora_tensors(tensors)
    meta = lora_metadata(tensors, metadata)
    with atomic_path(path) as tmp:
        save_file({k: t.detach().contiguous() for k, t in tensors.items()}, tmp, metadata=meta)


def training_metadata(rcfg: ReflowConfig, steps_trained: int, summary: dict | None = None) -> dict[str, str]:
    """cfg_mode ("sync" | "fixed"), cfg_scale (only with "fixed"), steps_trained and the optional JSON summary;
    time_kind "flow" and flow_shift for a flow-matching teacher."""
    meta = {"cfg_mode": rcfg.cfg_mode, "steps_trained": str(steps_trained)}
    if rcfg.time_kind == "flow":
        meta |= {"time_kind": "flow", "flow_shift": format(float(rcfg.flow_shift), ".15g")}
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
