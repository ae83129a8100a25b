"""The PeRFlow delta file: dW = W_perflow - W_base as safetensors with string metadata (docs/delta-format.md)."""

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from .architecture import ARCH_NAMES, ARCHITECTURES, FLOW_ARCHITECTURES, guess_architecture
from .atomic_file import atomic_path
from .flow_windows import check_flow_shift
from .number_parsing import finite, parse_float, parse_int
from .parameterization import PARAMETERIZATIONS
from .windows import check_num_windows

FORMAT_NAME = "delta"
LORA_FORMAT_NAME = "lora"  # kohya lora_unet_* keys with the same PeRFlow metadata
FORMAT_VERSION = "1"
CFG_MODES = ("sync", "fixed")
TIME_KINDS = ("diffusion", "flow")  # absent = "diffusion": the SD family, every file written before flow models
# Metadata keys written by save_delta itself; `extra` may not override them.
RESERVED_KEYS = (
    "perflow_format",
    "perflow_format_version",
    "parameterization",
    "num_windows",
    "base_architecture",
    "base_hash",
)
_FIELD_KEYS = ("cfg_mode", "cfg_scale", "steps_trained", "training_summary", "time_kind", "flow_shift")


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
    cfg_scale: float | None = None
    format: str = FORMAT_NAME
    time_kind: str = ""  # "" (absent) or "diffusion": the SD family; "flow": a rectified-flow base (SD3, Flux)
    flow_shift: float | None = None  # the time shift of the flow schedule (steps inside the windows; flow_windows)

    def __post_init__(self) -> None:
        if self.format not in (FORMAT_NAME, LORA_FORMAT_NAME):
            raise ValueError(f"perflow_format must be {FORMAT_NAME!r} or {LORA_FORMAT_NAME!r}, got {self.format!r}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {self.parameterization!r}"
            )
        check_num_windows(self.num_windows)
        if self.base_architecture not in ARCHITECTURES:
            raise ValueError(
                f"base_architecture must be one of {', '.join(ARCHITECTURES)}, got {self.base_architecture!r}"
            )
        if len(self.base_hash) != 64 or any(c not in "0123456789abcdef" for c in self.base_hash):
            raise ValueError(f"base_hash must be 64 lowercase hex characters (sha256), got {self.base_hash!r}")
        if self.cfg_mode not in ("", *CFG_MODES):
            raise ValueError(f"cfg_mode must be one of {', '.join(CFG_MODES)} (or absent), got {self.cfg_mode!r}")
        if self.cfg_scale is not None:
            if self.cfg_mode != "fixed":
                raise ValueError(f"cfg_scale goes only with cfg_mode 'fixed', not {self.cfg_mode or 'none'!r}")
            if finite(self.cfg_scale, "cfg_scale") < 0:
                raise ValueError(f"cfg_scale must not be negative, got {self.cfg_scale!r}")
        self._check_time_kind()
        bad_steps = isinstance(self.steps_trained, bool) or not isinstance(self.steps_trained, int | None)
        if bad_steps or (self.steps_trained is not None and self.steps_trained < 0):
            raise ValueError(f"steps_trained must be a non-negative integer, got {self.steps_trained!r}")
        if self.training_summary is not None and not isinstance(self.training_summary, dict):
            raise ValueError("training_summary must be a JSON object")
        for k, v in self.extra.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"metadata entries must be strings, got {k!r}: {v!r}")
            if k in RESERVED_KEYS or k in _FIELD_KEYS:
                raise ValueError(f"metadata key {k!r} is set by its own field, not by extra")

    @property
    def is_flow(self) -> bool:
        """A PeRFlow model of a rectified-flow base: windows from perflow_core.flow_windows with flow_shift."""
        return self.time_kind == "flow"

    def _check_time_kind(self) -> None:
        """time_kind is known; a flow file has the velocity parameterization, a flow_shift and a flow (or toy)
        base; a diffusion file has neither flow_shift nor a flow base."""
        if self.time_kind not in ("", *TIME_KINDS):
            raise ValueError(
                f"time_kind must be one of {', '.join(TIME_KINDS)} (or absent: diffusion), got {self.time_kind!r}; "
                "a newer ComfyUI-PeRFlow may read this file"
            )
        if not self.is_flow:
            if self.flow_shift is not None:
                raise ValueError("flow_shift goes only with time_kind 'flow'")
            if self.base_architecture in FLOW_ARCHITECTURES:
                raise ValueError(
                    f"base_architecture {self.base_architecture!r} is a flow-matching model: its PeRFlow files say "
                    "time_kind 'flow' and their flow_shift"
                )
            return
        if self.parameterization != "velocity":
            raise ValueError(f"a time_kind 'flow' file has parameterization 'velocity', got {self.parameterization!r}")
        if self.flow_shift is None:
            raise ValueError("a time_kind 'flow' file needs flow_shift (the time shift of its windows; 1 = none)")
        check_flow_shift(self.flow_shift)
        if self.base_architecture not in (*FLOW_ARCHITECTURES, "toy"):
            raise ValueError(
                f"time_kind 'flow' goes with a flow-matching base ({', '.join(FLOW_ARCHITECTURES)}) or the toy, "
                f"not {ARCH_NAMES[self.base_architecture]}"
            )

    def to_metadata(self) -> dict[str, str]:
        """The safetensors header metadata (all strings)."""
        meta = {
            "perflow_format": self.format,
            "perflow_format_version": FORMAT_VERSION,
            "parameterization": self.parameterization,
            "num_windows": str(self.num_windows),
            "base_architecture": self.base_architecture,
            "base_hash": self.base_hash,
        }
        if self.cfg_mode:
            meta["cfg_mode"] = self.cfg_mode
        if self.cfg_scale is not None:
            meta["cfg_scale"] = format(float(self.cfg_scale), ".15g")  # 3 -> "3", 7.5 -> "7.5"
        if self.steps_trained is not None:
            meta["steps_trained"] = str(self.steps_trained)
        if self.training_summary is not None:
            meta["training_summary"] = json.dumps(self.training_summary, sort_keys=True)
        if self.time_kind:
            meta["time_kind"] = self.time_kind
        if self.flow_shift is not None:
            meta["flow_shift"] = format(float(self.flow_shift), ".15g")
        return {**meta, **self.extra}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "DeltaMetadata":
        """Parse and validate header metadata (perflow_format 'delta' or 'lora'); ValueError names the entry."""
        fmt = meta.get("perflow_format")
        if fmt not in (FORMAT_NAME, LORA_FORMAT_NAME):
            raise ValueError(
                f"not a PeRFlow delta or LoRA: perflow_format is {fmt!r}, not {FORMAT_NAME!r} or {LORA_FORMAT_NAME!r}"
            )
        if meta.get("perflow_format_version") != FORMAT_VERSION:
            raise ValueError(
                f"unsupported perflow_format_version {meta.get('perflow_format_version')!r}; this version reads "
                f"{FORMAT_VERSION!r} (update ComfyUI-PeRFlow)"
            )
        missing = [k for k in RESERVED_KEYS if k not in meta]
        if missing:
            raise ValueError(f"PeRFlow {fmt} metadata lacks {', '.join(missing)}")
        return cls(
            parameterization=meta["parameterization"],
            num_windows=parse_int(meta["num_windows"], "metadata num_windows"),
            base_architecture=meta["base_architecture"],
            base_hash=meta["base_hash"],
            **_field_values(meta),
            extra={k: v for k, v in meta.items() if k not in RESERVED_KEYS and k not in _FIELD_KEYS},
            format=fmt,
        )


def _field_values(entries: dict[str, str]) -> dict:
    """cfg_mode/cfg_scale/steps_trained/training_summary/time_kind/flow_shift parsed from strings; legacy cfg_mode
    values of older files, 'cfg_sync' and 'cfg_fixed <scale>', become 'sync' and 'fixed' with cfg_scale."""
    values = {}
    mode = entries.get("cfg_mode", "")
    if "cfg_scale" in entries:
        values["cfg_scale"] = parse_float(entries["cfg_scale"], "metadata cfg_scale")
    if mode == "cfg_sync":
        mode = "sync"
    elif mode.startswith("cfg_fixed"):
        scale = mode.removeprefix("cfg_fixed").strip(" ")
        if scale:
            values["cfg_scale"] = parse_float(scale, f"the scale in cfg_mode {mode!r}")
        mode = "fixed"
    values["cfg_mode"] = mode
    if "steps_trained" in entries:
        values["steps_trained"] = parse_int(entries["steps_trained"], "metadata steps_trained")
    if "training_summary" in entries:
        values["training_summary"] = _parse_json(entries["training_summary"])
    if "time_kind" in entries:
        values["time_kind"] = entries["time_kind"]
    if "flow_shift" in entries:
        values["flow_shift"] = parse_float(entries["flow_shift"], "metadata flow_shift")
    return values


def _parse_json(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"metadata training_summary is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ValueError("metadata training_summary must be a JSON object")
    return parsed


def check_delta_tensors(tensors: dict[str, torch.Tensor], base_architecture: str) -> None:
    """What a delta may hold: named floating-point tensors with elements, all finite, whose shapes are of
    `base_architecture` (docs/delta-format.md); ValueError otherwise."""
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError("a delta needs at least one tensor")
    for key, t in tensors.items():
        if not isinstance(key, str) or not key or "\x00" in key:
            raise ValueError(f"tensor names must be non-empty strings without NUL characters, got {key!r}")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{key}: a delta tensor must be a floating-point torch.Tensor, got {kind}")
        if t.numel() == 0:
            raise ValueError(f"{key}: a delta tensor must hold at least one value, got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{key}: delta holds non-finite values (NaN or inf); refusing to save it")
    shaped = guess_architecture({k: tuple(t.shape) for k, t in tensors.items()})
    if shaped != "unknown" and shaped != base_architecture:
        raise ValueError(
            f"base_architecture is {base_architecture!r} but the tensor shapes are {ARCH_NAMES[shaped]}'s; "
            f"pass base_architecture={shaped!r}"
        )


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
    """Validate, then write atomically (temp file in the same folder + os.replace); `extra` may set cfg_mode,
    cfg_scale, steps_trained, training_summary, time_kind, flow_shift (strings, read as the metadata reader reads
    them) and free entries."""
    extra = dict(extra or {})
    fields = _field_values({k: extra.pop(k) for k in _FIELD_KEYS if k in extra})
    meta = DeltaMetadata(parameterization, num_windows, base_architecture, base_hash, extra=extra, **fields)
    check_delta_tensors(tensors, base_architecture)
    with atomic_path(path) as tmp:
        save_file({k: t.detach().contiguous() for k, t in tensors.items()}, tmp, metadata=meta.to_metadata())
