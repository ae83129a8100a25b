"""What the PeRFlow nodes share: menu categories, search aliases, the ComfyUI version check, PeRFlow model sampling.

The nodes use ComfyUI's V3 schema from `comfy_api.latest`, not a pinned `comfy_api.v0_0_X`: in ComfyUI 0.3.64 the
pinned `v0_0_2` only re-exports `latest.io` (so a pin buys no stability there), core's own nodes import `latest`,
and every V3 piece used here (ComfyNode, Schema, the Model/Int/Float/Combo/String/Sampler/Sigmas sockets,
NodeOutput, ComfyExtension, the comfy_entrypoint loader) is in `latest` as released in 0.3.52 (the oldest ComfyUI
this pack accepts) and in 0.3.64.
"""

import copy
import dataclasses
import logging

from ..perflow_core.model_sampling import FLOW_WINDOWS_ATTR, PeRFlowModelSampling, flow_shift_of
from ..perflow_core.sampling_guard import perflow_windows
from ..perflow_core.windows import check_num_windows

log = logging.getLogger("perflow")

# Today's core menu layout: samplers and schedulers sit with the stock ones under model/sampling; the model patches
# of this pack (model sampling, delta loader, CFG schedule) share one submenu next to them.
CATEGORY = "model/sampling/perflow"
SAMPLER_CATEGORY = "model/sampling/samplers"
SCHEDULER_CATEGORY = "model/sampling/schedulers"
SEARCH_ALIASES = ["perflow", "piecewise rectified flow", "few-step", "4 step", "accelerator", "turbo"]
# WrappersMP.PREDICT_NOISE (the CFG schedule) first shipped in 0.3.52; V3 nodes in 0.3.48. Keep pyproject.toml's
# requires-comfyui in step with this.
MIN_COMFYUI = "0.3.52"
ADD_SAMPLING_HINT = "add a 'PeRFlow Model Sampling' or 'PeRFlow Delta Loader' node after the checkpoint loader"


def comfyui_too_old() -> str | None:
    """Why the running ComfyUI cannot host this pack (a one-line message naming the fix), or None when it can."""
    try:
        from comfy.patcher_extension import WrappersMP
    except ImportError:  # a ComfyUI from before December 2024
        WrappersMP = None
    if hasattr(WrappersMP, "PREDICT_NOISE"):
        return None
    try:
        from comfyui_version import __version__ as found
    except ImportError:
        found = "unknown"
    return (
        f"ComfyUI-PeRFlow needs ComfyUI >= {MIN_COMFYUI} (V3 nodes, WrappersMP.PREDICT_NOISE) but this one is "
        f"{found}; its nodes are not loaded. Update ComfyUI (git pull, or the updater of the portable build)."
    )


def schema(**fields):
    """io.Schema for a PeRFlow node, with the pack's search aliases where the running ComfyUI has that field
    (it is newer than 0.3.64, where Schema is a dataclass that rejects unknown fields)."""
    from comfy_api.latest import io

    if "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}:
        fields["search_aliases"] = SEARCH_ALIASES + fields.pop("search_aliases", [])
    else:
        fields.pop("search_aliases", None)
    return io.Schema(**fields)


def model_windows(model) -> tuple[int, float | None]:
    """(K, flow shift) of a PeRFlow model (shift None for the SD family), or a clear error naming the node to add."""
    return perflow_windows(model.get_model_object("model_sampling"), ADD_SAMPLING_HINT)


def is_flow_model(model) -> bool:
    """True for a rectified-flow model (ComfyUI's CONST model sampling: SD3, Flux, ...)."""
    import comfy.model_sampling

    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def with_flow_windows(model, parameterization: str, num_windows: int):
    """A clone of a rectified-flow `model` whose own model sampling (copied, noise definition and shift untouched)
    carries K: the PeRFlow schedule, sampler and CFG schedule read it; the Euler step is the model's own."""
    if parameterization != "velocity":
        raise ValueError(
            f"this is a rectified-flow model ({model_family(model)}): it predicts a velocity, so PeRFlow's "
            f"parameterization must be 'velocity', not {parameterization!r}. Set parameterization to velocity"
        )
    check_num_windows(num_windows)
    base = model.get_model_object("model_sampling")
    flow_shift_of(base)  # refuses a flow model sampling whose windows cannot be placed
    marked = copy.deepcopy(base)
    setattr(marked, FLOW_WINDOWS_ATTR, num_windows)
    m = model.clone()
    m.add_object_patch("model_sampling", marked)
    return m


def model_family(model) -> str:
    """The ComfyUI model config name (SD15, SDXL, SD3, Flux, ...) for messages."""
    return type(model.model.model_config).__name__


def with_perflow_sampling(model, parameterization: str, num_windows: int):
    """A clone of `model` whose model sampling is PeRFlow's, with the base model's own noise table; for a
    rectified-flow model, its own model sampling marked with the windows (with_flow_windows)."""
    if is_flow_model(model):
        return with_flow_windows(model, parameterization, num_windows)
    base = model.get_model_object("model_sampling")
    if isinstance(base, PeRFlowModelSampling):
        alphas_cumprod = base.alphas_cumprod
    else:
        sigmas = getattr(base, "sigmas", None)
        if sigmas is None or sigmas.ndim != 1 or len(sigmas) != 1000 or float(sigmas[0]) <= 0:
            raise ValueError(
                f"PeRFlow needs a Stable Diffusion 1.5 / 2.1 / XL model (1000-step discrete noise table) or a "
                f"rectified-flow model (SD3, Flux); this model uses {type(base).__name__}. Load one of those."
            )
        alphas_cumprod = 1.0 / (1.0 + sigmas.float().cpu() ** 2)  # ComfyUI stores sigma = sqrt((1 - ac) / ac)
    m = model.clone()
    m.add_object_patch("model_sampling", PeRFlowModelSampling(parameterization, num_windows, alphas_cumprod))
    return m
