"""PeRFlow Delta Loader node: applies a PeRFlow delta, merged model or LoRA to any model of the same family."""

import os

import torch
from comfy_api.latest import io

from ..perflow_core.delta_keys import (
    ARCH_NAMES,
    WeightFile,
    check_time_kind,
    diffusers_key_map,
    diffusers_lora_module,
    flow_shift_note,
    guess_architecture,
    kohya_module,
    ldm_key_map,
    mismatch_error,
    plan_keys,
    plan_kohya,
    read_weight_file,
    resolve_num_windows,
    resolve_parameterization,
)
from ..perflow_core.model_sampling import flow_shift_of
from ..perflow_core.number_parsing import finite
from ..perflow_core.parameterization import PARAMETERIZATIONS
from ..perflow_core.safetensors_file import DeltaFileError, read_header
from .common import CATEGORY, is_flow_model, log, model_family, schema, with_perflow_sampling

FOLDER = "perflow"
LORA_PREFIX = "loras/"
EXTENSIONS = {".safetensors", ".sft"}


def register_folder() -> None:
    """Register models/perflow (safetensors only) and create it if it is missing; idempotent."""
    import folder_paths

    path = os.path.join(folder_paths.models_dir, FOLDER)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a read-only models folder: the dropdown still lists models/loras and extra paths
        log.warning("PeRFlow: could not create %s (%s); put PeRFlow files there by hand", path, e.strerror or e)
    folder_paths.add_model_folder_path(FOLDER, path, is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, EXTENSIONS)


def file_choices() -> list[str]:
    """Files in models/perflow, then safetensors files in models/loras shown as 'loras/<name>'."""
    import folder_paths

    register_folder()
    loras = [n for n in folder_paths.get_filename_list("loras") if os.path.splitext(n)[1] in EXTENSIONS]
    return folder_paths.get_filename_list(FOLDER) + [LORA_PREFIX + n for n in loras]


def resolve_path(name: str) -> str:
    """Full path of a dropdown choice."""
    import folder_paths

    register_folder()
    if name.startswith(LORA_PREFIX):
        return folder_paths.get_full_path_or_raise("loras", name[len(LORA_PREFIX) :])
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def weight_patches(model, wf: WeightFile) -> tuple[dict, str]:
    """(model key -> patch, model architecture) for ComfyUI's add_patches; DeltaFileError if anything does not fit."""
    import comfy.lora
    import comfy.utils

    msd = model.model_state_dict()  # the unpatched weights, by reference
    model_shapes = {k: tuple(v.shape) for k, v in msd.items() if k.startswith("diffusion_model.")}
    model_arch = guess_architecture(model_shapes)
    shapes = {k: tuple(t.shape) for k, t in wf.tensors.items()}
    if wf.format in ("kohya_lora", "diffusers_lora"):
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        module_of = kohya_module if wf.format == "kohya_lora" else diffusers_lora_module
        plan = plan_kohya(shapes, key_map, model_shapes, module_of)
    elif wf.format.startswith("diffusers"):
        unet_config = model.model.model_config.unet_config
        plan = plan_keys(
            shapes, diffusers_key_map(list(shapes), comfy.utils.unet_to_diffusers(unet_config)), model_shapes
        )
    else:
        plan = plan_keys(shapes, ldm_key_map(list(shapes)), model_shapes)
    if not plan.ok:
        raise mismatch_error(wf.path, plan, wf.architecture, model_arch)
    if wf.format in ("kohya_lora", "diffusers_lora"):
        patches = comfy.lora.load_lora(wf.tensors, key_map)
        if set(patches) != set(plan.pairs.values()):
            raise DeltaFileError(
                wf.path, f"ComfyUI turned {len(patches)} of {len(plan.pairs)} LoRA modules into patches", "report this"
            )
        return patches, model_arch
    patches = {}
    buffers = {"diffusion_model." + k for k, _ in model.model.diffusion_model.named_buffers()}
    for fkey, mkey in plan.pairs.items():
        t = wf.tensors.pop(fkey)  # one tensor at a time: a merged file becomes its own delta in place
        if wf.format.endswith("merged"):
            t = (t.float() - msd[mkey].to(device="cpu", dtype=torch.float32)).to(t.dtype)
        if mkey in buffers:  # ComfyUI patches parameters only (SD3's pos_embed is a buffer)
            if t.any():
                raise DeltaFileError(
                    wf.path,
                    f"it changes {fkey}, a fixed buffer of the model that ComfyUI's weight patches never reach",
                    "export the file again without that key (a trained delta leaves it at zero)",
                )
            continue
        patches[mkey] = ("diff", (t,))
    return patches, model_arch


def load_delta(model, path: str, strength: float, parameterization: str, num_windows: int):
    """(patched clone with PeRFlow sampling, summary); the input model is never modified."""
    strength = finite(strength, "strength")
    wf = read_weight_file(path)
    log.info("PeRFlow: %s is a %s file (%s)", os.path.basename(path), wf.format, ARCH_NAMES[wf.architecture])
    flow = is_flow_model(model)
    check_time_kind(wf, flow, model_name(model))
    try:
        param, p_note = resolve_parameterization(parameterization, wf.format, wf.architecture, wf.metadata)
    except ValueError as e:
        raise DeltaFileError(path, str(e), "choose diff_eps, ddim_eps or velocity") from None
    windows, w_note = resolve_num_windows(num_windows, wf.metadata)
    for note in (p_note, w_note):
        if note:
            log.warning("PeRFlow: %s: %s", os.path.basename(path), note)
    if wf.format.endswith("merged"):
        log.warning(
            "PeRFlow: %s is a merged model; dW = merged - connected model is exact only for the base it "
            "was merged from",
            os.path.basename(path),
        )
    patches, model_arch = weight_patches(model, wf)
    patched = model.clone()
    accepted = patched.add_patches(patches, strength)
    if len(accepted) != len(patches):
        raise DeltaFileError(path, f"ComfyUI accepted {len(accepted)} of {len(patches)} patches", "report this")
    out = with_perflow_sampling(patched, param, windows)
    shift_note = flow_shift_note(wf, flow_shift_of(out.get_model_object("model_sampling"))) if flow else ""
    if shift_note:
        log.warning("PeRFlow: %s: %s", os.path.basename(path), shift_note)
    summary = (
        f"{os.path.basename(path)}: {wf.format}, {ARCH_NAMES[wf.architecture]} file on {ARCH_NAMES[model_arch]} "
        f"model; {len(accepted)} weights patched at strength {strength:g}; parameterization {param}, "
        f"{windows} windows"
    )
    if wf.metadata is not None:
        summary += f"; trained on base {wf.metadata.base_hash[:12]}"
    if flow:
        summary += f"; flow model sampling at shift {flow_shift_of(out.get_model_object('model_sampling')):.4g}"
    summary += "".join(f"; {note}" for note in (p_note, w_note, shift_note) if note)  # guesses, overrides
    if wf.format == "kohya_lora":
        skipped = {k.split(".", 1)[0] for k in read_header(path).tensors if not k.startswith("lora_unet_")}
        if skipped:
            summary += f"; {len(skipped)} text-encoder LoRA modules skipped (this node patches the UNet only)"
    log.info("PeRFlow: %s", summary)
    return out, summary


def model_name(model) -> str:
    """The connected model's family for messages: the architecture its weights show, else ComfyUI's config name."""
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict().items() if k.startswith("diffusion_model.")}
    arch = guess_architecture(shapes)
    return ARCH_NAMES[arch] if arch != "unknown" else model_family(model)


class PeRFlowDeltaLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="PeRFlowDeltaLoader",
            display_name="PeRFlow Delta Loader",
            category=CATEGORY,
            search_aliases=["delta", "lora", "perflow lora", "load perflow"],
            description="Turns an SD1.5 / SD2.1 / SDXL, SD3 / SD3.5 or Flux model (base or fine-tune) into a few-step "
            "PeRFlow model: adds strength * dW through ComfyUI's own weight patches and sets PeRFlow model sampling. "
            "Reads PeRFlow delta files, the published diffusers-format delta, merged PeRFlow UNets (dW = merged - "
            "connected model), kohya LoRAs (UNet part) and diffusers transformer.* LoRAs of SD3 / Flux. Refuses "
            "files that do not fit the model (nothing applied) and pickle files (.ckpt/.pt/.bin). SD3 / Flux files "
            "(time_kind flow) keep the model's own model sampling and shift and add the windows.",
            inputs=[
                io.Model.Input("model", tooltip="The base model or fine-tune (same family as the PeRFlow file)."),
                io.Combo.Input(
                    "delta_name",
                    options=file_choices(),
                    tooltip="A .safetensors file in models/perflow, or in models/loras (shown as loras/...).",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-2.0,
                    max=2.0,
                    step=0.05,
                    tooltip="Scale of the weight difference: W + strength * dW (1.0 = as trained).",
                ),
                io.Combo.Input(
                    "parameterization",
                    options=["auto", *PARAMETERIZATIONS],
                    default="auto",
                    tooltip="auto: from the file's metadata (our deltas win over any choice), diff_eps for the "
                    "published SD1.5 delta. Published SDXL: ddim_eps, SD2.1: velocity.",
                ),
                io.Int.Input(
                    "num_windows",
                    default=0,
                    min=0,
                    max=16,
                    tooltip="Time windows K; 0 = from the file's metadata, else 4 (the published models).",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="model",
                    tooltip="The model with the PeRFlow weights and model sampling; the input model is left unchanged.",
                ),
                io.String.Output(
                    display_name="summary",
                    tooltip="What was detected and applied: format, architecture, weights patched, "
                    "parameterization, windows. Connect it to a Preview Any node to read it.",
                ),
            ],
        )

    @classmethod
    def execute(cls, model, delta_name, strength, parameterization, num_windows) -> io.NodeOutput:
        return io.NodeOutput(*load_delta(model, resolve_path(delta_name), strength, parameterization, num_windows))
