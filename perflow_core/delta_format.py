"""The PeRFlow delta file: dW = W_perflow - W_base as safetensors with string metadata (docs/delta-format.md)."""

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from .atomic_file import atomic_path
from .parameterization import PARAMETERIZATIONS
from .windows import NUM_TRAIN_TIMESTEPS

FORMAT_NAME = "delta"
FORMAT_VERSION = "1"
ARCHITECTURES = ("sd15", "sd21", "sdxl", "toy")
# Metadata keys written by save_delta itself; `extra` may not override them.
RESERVED_KEYS = (
    "perflow_format",
    "perflow_format_version",
    "parameterization",
    "num_windows",
    "base_architecture",
    "base_hash",
)


def state_dict_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 hex over sorted keys; per key a JSON line [key, dtype, shape, nbytes] then the raw little-endian bytes."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        dtype = str(t.dtype).removeprefix("torch.")
        h.update(json.dumps([key, dtype, list(t.shape), t.numel() * t.element_size()]).encode() + b"\n")
        h.update(raw)
    return h.hexdigest()


def _check_num_windows(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_windows must be an integer in 1..{NUM_TRAIN_TIMESTEPS}, got {value!r}")


@dataclass(frozen=True)
class DeltaMetadata:
    """Validated metadata of a PeRFlow delta file; `extra` holds any further string entries."""

    parameterization: str
    num_windows: int
    base_architecture: str
    base_hash: str
    cfg_mode: str = ""
    steps_trained: int | None = None
    training_summary: dict | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {self.parameterization!r}"
            )
        _check_num_windows(self.num_windows)
        if self.base_architecture not in ARCHITECTURES:
            raise ValueError(
                f"base_architecture must be one of {', '.join(ARCHITECTURES)}, got {self.base_architecture!r}"
            )
        if len(self.base_hash) != 64 or any(c not in "0123456789abcdef" for c in self.base_hash):
            raise ValueError(f"base_hash must be 64 lowercase hex characters (sha256), got {self.base_hash!r}")
        if not isinstance(self.cfg_mode, str):
            raise ValueError(f"cfg_mode must be a string, got {self.cfg_mode!r}")
        if self.steps_trained is not None and (not isinstance(self.steps_trained, int) or self.steps_trained < 0):
            raise ValueError(f"steps_trained must be a non-negative integer, got {self.steps_trained!r}")
        if self.training_summary is not None and not isinstance(self.training_summary, dict):
            raise ValueError("training_summary must be a JSON object")
        for k, v in self.extra.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"metadata entries must be strings, got {k!r}: {v!r}")
            if k in RESERVED_KEYS or k in ("cfg_mode", "steps_trained", "training_summary"):
                raise ValueError(f"metadata key {k!r} is set by its own field, not by extra")

    def to_metadata(self) -> dict[str, str]:
        """The safetensors header metadata (all strings)."""
        meta = {
            "perflow_format": FORMAT_NAME,
            "perflow_format_version": FORMAT_VERSION,
            "parameterization": self.parameterization,
            "num_windows": str(self.num_windows),
            "base_architecture": self.base_architecture,
            "base_hash": self.base_hash,
        }
        if self.cfg_mode:
            meta["cfg_mode"] = self.cfg_mode
        if self.steps_trained is not None:
            meta["steps_trained"] = str(self.steps_trained)
        if self.training_summary is not None:
            meta["training_summary"] = json.dumps(self.training_summary, sort_keys=True)
        return {**meta, **self.extra}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "DeltaMetadata":
        """Parse and validate header metadata; ValueError names the offending entry."""
        if meta.get("perflow_format") != FORMAT_NAME:
            raise ValueError(f"not a PeRFlow delta: perflow_format is {meta.get('perflow_format')!r}, not 'delta'")
        if meta.get("perflow_format_version") != FORMAT_VERSION:
            raise ValueError(
                f"unsupported perflow_format_version {meta.get('perflow_format_version')!r}; this version reads "
                f"{FORMAT_VERSION!r} (update ComfyUI-PeRFlow)"
            )
        missing = [k for k in RESERVED_KEYS if k not in meta]
        if missing:
            raise ValueError(f"PeRFlow delta metadata lacks {', '.join(missing)}")
        return cls(
            parameterization=meta["parameterization"],
            num_windows=_parse_int(meta, "num_windows"),
            base_architecture=meta["base_architecture"],
            base_hash=meta["base_hash"],
            cfg_mode=meta.get("cfg_mode", ""),
            steps_trained=_parse_int(meta, "steps_trained") if "steps_trained" in meta else None,
            training_summary=_parse_json(meta["training_summary"]) if "training_summary" in meta else None,
            extra={
                k: v
                for k, v in meta.items()
                if k not in RESERVED_KEYS and k not in ("cfg_mode", "steps_trained", "training_summary")
            },
        )


def _parse_int(meta: dict[str, str], key: str) -> int:
    value = meta[key]
    if not isinstance(value, str) or not value.isdigit():
        raise ValueError(f"metadata {key} must be a decimal integer, got {value!r}")
    return int(value)


def _parse_json(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"metadata training_summary is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ValueError("metadata training_summary must be a JSON object")
    return parsed


def _check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    if not tensors:
        raise ValueError("a delta needs at least one tensor")
    for key, t in tensors.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"tensor keys must be non-empty strings, got {key!r}")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{key}: a delta tensor must be a floating-point torch.Tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"{key}: delta holds non-finite values (NaN or inf); refusing to save it")


def save_delta(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    parameterization: str,
    num_windows: int,
    base_architecture: str,
    base_hash: str,
    extra: dict[str, str] | None = None,
) -> None:
    """Validate, then write atomically (temp file in the same folder + os.replace); `extra` may set cfg_mode etc."""
    extra = dict(extra or {})
    known = {}
    if "cfg_mode" in extra:
        known["cfg_mode"] = extra.pop("cfg_mode")
    if "steps_trained" in extra:
        known["steps_trained"] = _parse_int({"steps_trained": extra.pop("steps_trained")}, "steps_trained")
    if "training_summary" in extra:
        known["training_summary"] = _parse_json(extra.pop("training_summary"))
    meta = DeltaMetadata(parameterization, num_windows, base_architecture, base_hash, extra=extra, **known)
    _check_tensors(tensors)
    with atomic_path(path) as tmp:
        save_file({k: t.detach().contiguous() for k, t in tensors.items()}, tmp, metadata=meta.to_metadata())
