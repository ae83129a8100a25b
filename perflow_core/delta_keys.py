"""Which kind of weight file this is, which architecture it is for, and how its keys land on a model's keys."""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .architecture import ARCH_NAMES, FLOW_ARCHITECTURES, guess_architecture
from .delta_format import FORMAT_NAME, LORA_FORMAT_NAME, DeltaMetadata
from .parameterization import PARAMETERIZATIONS
from .safetensors_file import DeltaFileError, Header, TensorInfo, iter_tensors, read_header
from .windows import DEFAULT_NUM_WINDOWS

FORMATS = (
    "perflow_delta",
    "diffusers_delta",
    "diffusers_merged",
    "ldm_delta",
    "ldm_merged",
    "kohya_lora",
    "diffusers_lora",
)
LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_DIFFUSERS_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "conv_out.", "time_embedding.")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "diff", "diff_b")
# diffusers / peft LoRAs of SD3 and Flux transformers: transformer.<diffusers module>.lora_A/lora_B (or down/up).
DIFFUSERS_LORA_PREFIX = "transformer."
_DIFFUSERS_LORA_PARTS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_down.weight": "lora_down.weight",
    "lora_up.weight": "lora_up.weight",
    "alpha": "alpha",
}
_MERGED_NORM_MEAN = 0.5  # norm weights sit near 1 in a model and near 0 in a difference of two models


def _unet_prefix(key: str) -> str:
    return next((p for p in LDM_PREFIXES if key.startswith(p)), "")


def key_style(keys: list[str], metadata: dict[str, str]) -> str:
    """'perflow_delta', 'kohya_lora', 'diffusers' or 'ldm' from key names and metadata; ValueError otherwise."""
    perflow_format = metadata.get("perflow_format")
    if perflow_format == FORMAT_NAME:
        return "perflow_delta"
    if perflow_format not in (None, LORA_FORMAT_NAME):
        raise ValueError(
            f"perflow_format {perflow_format!r} is not one this version reads ({FORMAT_NAME}, {LORA_FORMAT_NAME}); "
            "update ComfyUI-PeRFlow"
        )
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya_lora"
    if any(k.startswith(DIFFUSERS_LORA_PREFIX) and k.endswith(tuple(_DIFFUSERS_LORA_PARTS)) for k in keys):
        return "diffusers_lora"
    if perflow_format == LORA_FORMAT_NAME:
        raise ValueError(
            "perflow_format is 'lora' but the file has no kohya lora_unet_* or diffusers transformer.* keys"
        )
    if any(k.startswith(LDM_PREFIXES) for k in keys):
        return "ldm"
    if any(k.removeprefix("unet.").startswith(_DIFFUSERS_ROOTS) for k in keys):
        return "diffusers"
    raise ValueError(
        f"unrecognised key names (e.g. {', '.join(sorted(keys)[:3])}); expected a PeRFlow delta, diffusers UNet, "
        "LDM/ComfyUI UNet or kohya LoRA (lora_unet_*) file"
    )


def keeps_key(style: str) -> Callable[[str], bool]:
    """Filter for the UNet tensors of a file (a full checkpoint's VAE/CLIP and a LoRA's text-encoder are skipped)."""
    if style == "ldm":
        return lambda k: k.startswith(LDM_PREFIXES)
    if style == "kohya_lora":
        return lambda k: k.startswith("lora_unet_")
    if style == "diffusers_lora":
        return lambda k: k.startswith(DIFFUSERS_LORA_PREFIX)
    return lambda k: True


def looks_merged(tensors: dict[str, torch.Tensor]) -> bool:
    """True when normalization weights average near 1 (a full model); near 0 (or none found) means a delta."""
    means = [
        t.float().mean().item()
        for k, t in tensors.items()
        if t.ndim == 1 and k.endswith(("weight", "scale")) and _is_norm(k)  # Flux's RMS norms hold a `scale`
    ]
    return bool(means) and sorted(means)[len(means) // 2] > _MERGED_NORM_MEAN


def _is_norm(key: str) -> bool:
    parts = key.split(".")
    mmdit_qk = ".ln_q." in key or ".ln_k." in key  # SD3.5's RMS q/k norms
    return any("norm" in p for p in parts) or ".in_layers.0." in key or ".out_layers.0." in key or mmdit_qk


def detect_format(style: str, tensors: dict[str, torch.Tensor]) -> str:
    """One of FORMATS, from the key style and (for diffusers/LDM keys) the weight statistics."""
    if style in ("perflow_delta", "kohya_lora", "diffusers_lora"):
        return style
    return f"{style}_{'merged' if looks_merged(tensors) else 'delta'}"


def ldm_key_map(keys: list[str]) -> dict[str, str]:
    """LDM/ComfyUI keys (with either prefix) -> the model's 'diffusion_model.' keys."""
    return {k: "diffusion_model." + k.removeprefix(_unet_prefix(k)) for k in keys}


def diffusers_key_map(keys: list[str], unet_to_diffusers: dict[str, str]) -> dict[str, str]:
    """diffusers keys (optionally 'unet.'-prefixed) -> model keys, via ComfyUI's unet_to_diffusers table."""
    return {
        k: "diffusion_model." + unet_to_diffusers[k.removeprefix("unet.")]
        for k in keys
        if k.removeprefix("unet.") in unet_to_diffusers
    }


@dataclass
class KeyPlan:
    """Accepted (file key -> model key) pairs and what does not fit."""

    pairs: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.pairs) and not self.unmapped and not self.mismatched


def plan_keys(
    shapes: dict[str, tuple[int, ...]], key_map: dict[str, str], model_shapes: dict[str, tuple[int, ...]]
) -> KeyPlan:
    """Every file key must map to a distinct model key of the same shape (SD1.5 and SD2.1 differ only in shapes)."""
    plan, taken = KeyPlan(), set()
    for key in sorted(shapes):
        target = key_map.get(key)
        if target not in model_shapes or target in taken:
            plan.unmapped.append(key)
        elif tuple(model_shapes[target]) != tuple(shapes[key]):
            plan.mismatched.append((key, tuple(shapes[key]), tuple(model_shapes[target])))
        else:
            plan.pairs[key] = target
            taken.add(target)
    return plan


def kohya_module(key: str) -> tuple[str, str]:
    """(module, part) of a kohya LoRA key: 'lora_unet_x_y.lora_down.weight' -> ('lora_unet_x_y', 'lora_down.weight')."""
    name, _, part = key.partition(".")
    return name, part


def diffusers_lora_module(key: str) -> tuple[str, str]:
    """(module, part) of a diffusers/peft LoRA key, the part in kohya's words: 'transformer.a.to_q.lora_A.weight' ->
    ('transformer.a.to_q', 'lora_down.weight'); a key with no known part keeps its whole name (and is refused)."""
    for part, kohya_part in _DIFFUSERS_LORA_PARTS.items():
        if key.endswith("." + part):
            return key[: -len(part) - 1], kohya_part
    return key, ""


def plan_kohya(
    shapes: dict[str, tuple[int, ...]],
    key_map: dict,
    model_shapes: dict[str, tuple[int, ...]],
    module_of: Callable[[str], tuple[str, str]] = kohya_module,
) -> KeyPlan:
    """LoRA modules -> model keys. A module holds lora_down/lora_up (+ alpha), whose up @ down must give the
    weight's out x in size, or a full `diff` of the weight's shape; `diff_b` (a bias difference) may come with
    either, as ComfyUI's LoRA loader reads them. Pairs: module -> weight key, module.diff_b -> bias key. A key-map
    target may be (weight key, (dim, start, size)[, function]): a slice of a fused weight (ComfyUI's map of
    diffusers q/k/v onto SD3 / Flux qkv), whose size replaces the weight's along dim; None for the whole weight."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        name, part = module_of(key)
        modules.setdefault(name, {})[part] = shape
    plan = KeyPlan()
    for name in sorted(modules):
        parts, target = modules[name], key_map.get(name)
        if isinstance(target, tuple) and "diff_b" in parts:
            target = None  # a bias slice of a fused weight: not a form ComfyUI reads
        down, up, diff = parts.get("lora_down.weight"), parts.get("lora_up.weight"), parts.get("diff")
        lora = down is not None and up is not None
        has_weight = lora or diff is not None
        well_formed = (
            (down is None) == (up is None) and not (lora and diff is not None) and not set(parts) - set(_KOHYA_PARTS)
        )
        weight_key = target[0] if isinstance(target, tuple) else target
        if weight_key not in model_shapes or not well_formed or not (has_weight or "diff_b" in parts):
            plan.unmapped.append(name)
            continue
        w = tuple(model_shapes[weight_key])
        if isinstance(target, tuple) and target[1] is not None:  # (key, offset[, function]): offset is a slice
            dim, _, size = target[1]
            w = w[:dim] + (size,) + w[dim + 1 :]
        if diff is not None and tuple(diff) != w:
            plan.mismatched.append((name, tuple(diff), w))
        elif down is not None and ((up[0], math.prod(down[1:])) != (w[0], math.prod(w[1:])) or up[1] != down[0]):
            plan.mismatched.append((name, (up[0], *down[1:]), w))
        elif has_weight:
            plan.pairs[name] = target
        if "diff_b" in parts:
            bias = target.removesuffix(".weight") + ".bias"
            if bias not in model_shapes:
                plan.unmapped.append(name + ".diff_b")
            elif tuple(parts["diff_b"]) != tuple(model_shapes[bias]):
                plan.mismatched.append((name + ".diff_b", tuple(parts["diff_b"]), tuple(model_shapes[bias])))
            else:
                plan.pairs[name + ".diff_b"] = bias
    return plan


def mismatch_error(path: str | os.PathLike, plan: KeyPlan, file_arch: str, model_arch: str) -> DeltaFileError:
    """The refusal: counts, a few example keys, and which architecture the file looks like vs the model."""
    total = len(plan.pairs) + len(plan.unmapped) + len(plan.mismatched)
    parts = []
    if plan.unmapped:
        ex = ", ".join(plan.unmapped[:3])
        parts.append(f"{len(plan.unmapped)} of {total} keys have no counterpart in the model (e.g. {ex})")
    if plan.mismatched:
        ex = "; ".join(f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in plan.mismatched[:3])
        parts.append(f"{len(plan.mismatched)} of {total} keys differ in shape (e.g. {ex})")
    if not total:
        parts.append("it holds no UNet weights")
    if file_arch == model_arch != "unknown":
        where = (
            f"The file and the model are both {ARCH_NAMES[model_arch]}, but their UNets differ (another "
            f"{ARCH_NAMES[model_arch]} variant, e.g. inpainting or a resized UNet)"
        )
        fix = f"use a PeRFlow file made for this {ARCH_NAMES[model_arch]} variant, or connect the model it was made for"
    elif file_arch != "unknown":
        where = f"The file looks like {ARCH_NAMES[file_arch]}, the model is {ARCH_NAMES[model_arch]}"
        fix = (
            f"connect an {ARCH_NAMES[file_arch]} checkpoint, or pick the PeRFlow file made for {ARCH_NAMES[model_arch]}"
        )
    else:
        where = f"The file's architecture cannot be told from its shapes, the model is {ARCH_NAMES[model_arch]}"
        fix = "use a PeRFlow file made for this model's architecture"
    problem = f"does not fit the connected model: {'; '.join(parts)}. {where}; nothing was applied"
    return DeltaFileError(path, problem, fix)


def resolve_parameterization(choice: str, fmt: str, arch: str, metadata: DeltaMetadata | None) -> tuple[str, str]:
    """(parameterization, note to log): our metadata wins, then the user's choice, then SD1.5 delta -> diff_eps."""
    if choice != "auto" and choice not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be auto or one of {', '.join(PARAMETERIZATIONS)}, got {choice!r}")
    if metadata is not None:
        note = ""
        if choice not in ("auto", metadata.parameterization):
            note = f"the file was trained with {metadata.parameterization}; ignoring the chosen {choice}"
        return metadata.parameterization, note
    if choice != "auto":
        return choice, ""
    if arch in FLOW_ARCHITECTURES:
        return "velocity", f"a PeRFlow file of a flow-matching {ARCH_NAMES[arch]} model predicts velocity"
    if fmt == "diffusers_delta" and arch == "sd15":
        return "diff_eps", "the published SD1.5 delta uses diff_eps"
    raise ValueError(
        "parameterization is 'auto' but this file does not say which one it was trained with; pick it on the node "
        "(published PeRFlow: SD1.5 delta diff_eps, SDXL ddim_eps, SD2.1 velocity)"
    )


def resolve_num_windows(choice: int, metadata: DeltaMetadata | None) -> tuple[int, str]:
    """(windows, note to log): the file's metadata wins, else the user's choice, else (0 = auto) the default 4."""
    if metadata is not None:
        note = ""
        if choice not in (0, metadata.num_windows):
            note = f"the file was trained with {metadata.num_windows} windows; ignoring the chosen {choice}"
        return metadata.num_windows, note
    return (choice or DEFAULT_NUM_WINDOWS), ""


@dataclass
class WeightFile:
    """A validated weight file's UNet tensors with what was detected about it."""

    path: str
    format: str
    architecture: str
    tensors: dict[str, torch.Tensor]
    metadata: DeltaMetadata | None


def check_weight_tensors(path: str | os.PathLike, style: str, infos: dict[str, TensorInfo]) -> None:
    """Before any data is read: a delta, model or LoRA holds floating-point tensors (a kohya `alpha` may be an
    integer scalar), and not only empty ones (docs/delta-format.md); raises DeltaFileError."""
    for key, info in infos.items():
        integer_alpha = (
            style in ("kohya_lora", "diffusers_lora")
            and key.endswith(".alpha")
            and info.shape == ()
            and info.dtype != "BOOL"
        )
        if info.dtype not in FLOAT_DTYPES and not integer_alpha:
            raise DeltaFileError(
                path,
                f"tensor {key!r} is {info.dtype}; weights and deltas are floating-point (F16, BF16, F32, F64)",
                "export the weights again as floating point",
            )
    if all(math.prod(info.shape) == 0 for info in infos.values()):
        raise DeltaFileError(path, "its UNet tensors are all empty (zero-size)", "export the weights again")


def read_weight_file(path: str | os.PathLike) -> WeightFile:
    """Read and classify a delta/merged/LoRA file, loading only its UNet tensors; raises DeltaFileError for every
    bad file. The architecture comes from the tensor shapes; the metadata's is used only where shapes cannot tell,
    and a file whose metadata contradicts its shapes is refused."""
    header: Header = read_header(path)
    try:
        style = key_style(list(header.tensors), header.metadata)
        has_metadata = style == "perflow_delta" or header.metadata.get("perflow_format") == LORA_FORMAT_NAME
        metadata = DeltaMetadata.from_metadata(header.metadata) if has_metadata else None
    except ValueError as e:
        raise DeltaFileError(path, str(e), "export the file again or pick another one") from None
    keep = keeps_key(style)
    kept = {k: info for k, info in header.tensors.items() if keep(k)}
    check_weight_tensors(path, style, kept)
    arch = guess_architecture({k: info.shape for k, info in kept.items()})
    if metadata is not None and arch == "unknown":
        arch = metadata.base_architecture
    elif metadata is not None and arch != metadata.base_architecture:
        raise DeltaFileError(
            path,
            f"its metadata says base_architecture {metadata.base_architecture!r} but its tensor shapes are "
            f"{ARCH_NAMES[arch]}'s",
            "export the file again with the right base_architecture",
        )
    tensors = dict(iter_tensors(path, header, keep))
    return WeightFile(os.fspath(path), detect_format(style, tensors), arch, tensors, metadata)


FLOW_SHIFT_RTOL = 1e-3  # a sampling shift this close to the trained one places the same windows


def check_time_kind(wf: WeightFile, model_is_flow: bool, model_name: str) -> None:
    """A flow-model PeRFlow file (time_kind flow, or SD3/Flux shapes) only on a rectified-flow model, an SD-family
    file only on an SD-family model: else DeltaFileError naming the model to connect."""
    if wf.metadata is not None:
        file_is_flow = wf.metadata.is_flow
    else:  # diffusers transformer.* LoRAs exist for the transformer (flow) families only
        file_is_flow = wf.architecture in FLOW_ARCHITECTURES or wf.format == "diffusers_lora"
    if file_is_flow == model_is_flow:
        return
    file_name = ARCH_NAMES[wf.architecture]
    if file_is_flow:
        raise DeltaFileError(
            wf.path,
            f"it is a PeRFlow file for a rectified-flow (flow-matching) {file_name} model, but the connected model "
            f"is {model_name}, a diffusion model; nothing was applied",
            f"connect the {file_name} model it was trained for (UNETLoader or a checkpoint loader), or pick a "
            f"PeRFlow file made for {model_name}",
        )
    raise DeltaFileError(
        wf.path,
        f"it is a PeRFlow file for the Stable Diffusion family ({file_name}, diffusion time), but the connected "
        f"model is {model_name}, a rectified-flow (flow-matching) model; nothing was applied",
        f"train a PeRFlow LoRA for this model (python -m training.train --backend comfy --checkpoint <its file>; "
        f"README 'Flow-matching models'), or connect the {file_name} model the file was made for",
    )


def flow_shift_note(wf: WeightFile, model_shift: float) -> str:
    """'' when a flow file's trained shift matches the model's sampling shift, else a note naming the fix (the
    windows stay at sigma 1 - k/K, but the shift places the steps inside them, away from the trained points)."""
    trained = wf.metadata.flow_shift if wf.metadata is not None else None
    if trained is None or abs(model_shift - trained) <= FLOW_SHIFT_RTOL * trained:
        return ""
    return (
        f"trained at flow shift {trained:g} but this model samples at shift {model_shift:g}: the windows stay, "
        "the steps inside them move off the trained points; to sample as trained, put ModelSamplingSD3 with shift "
        f"{trained:g} (Flux: ModelSamplingFlux for a mu of ln {trained:g} = {math.log(trained):.4g}) before this "
        "node, or remove the model-sampling node that changed the shift"
    )
