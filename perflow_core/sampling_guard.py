"""Sampling-time checks: the model sampling in use is PeRFlow's, and it sits on the noise table PeRFlow expects.

Other node packs swap the model sampling too. AnimateDiff-Evolved's "Use Evolved Sampling" with its default
beta_schedule 'autoselect' is the common case: placed after the PeRFlow nodes it replaces PeRFlow's model sampling
(the UNet would get stock timesteps); placed before them, PeRFlow is built on AnimateDiff's noise table instead of
Stable Diffusion's scaled-linear one. Both would sample without an error, so they are refused here.
"""

import logging

import torch

from .model_sampling import PeRFlowModelSampling, flow_shift_of, flow_windows_of
from .schedule import sd_alphas_cumprod
from .windows import NUM_TRAIN_TIMESTEPS

log = logging.getLogger("perflow")

ANIMATEDIFF_FIX = (
    "in AnimateDiff-Evolved's 'Use Evolved Sampling' (or 'Apply AnimateDiff Model (Gen1)') set beta_schedule to "
    "'use existing'"
)
TABLE_RTOL = 1e-3  # float32 sigma round trips stay below 1e-5; the tables told apart here differ by > 10 %


def _alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0).float()


def animatediff_tables() -> dict[str, torch.Tensor]:
    """The non-SD tables AnimateDiff-Evolved's 'autoselect' picks, by its beta_schedule name: SD1.5 motion modules
    get linear betas 0.00085..0.012 (ComfyUI 'sqrt_linear'), AnimateDiff-SDXL scaled-linear betas up to 0.020."""
    n = NUM_TRAIN_TIMESTEPS
    return {
        "sqrt_linear (AnimateDiff)": _alphas_cumprod(torch.linspace(0.00085, 0.012, n, dtype=torch.float64)),
        "linear (AnimateDiff-SDXL)": _alphas_cumprod(
            torch.linspace(0.00085**0.5, 0.020**0.5, n, dtype=torch.float64) ** 2
        ),
    }


def _same_table(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a.double() - b.double()).abs() <= TABLE_RTOL * b.double()).all())


def table_name(alphas_cumprod: torch.Tensor) -> str:
    """'sd' for Stable Diffusion's scaled-linear table, an AnimateDiff-Evolved beta_schedule name, or 'unknown'."""
    ac = torch.as_tensor(alphas_cumprod).detach().cpu()
    if _same_table(ac, sd_alphas_cumprod()):
        return "sd"
    return next((name for name, table in animatediff_tables().items() if _same_table(ac, table)), "unknown")


def _table_of(model_sampling) -> torch.Tensor | None:
    """alphas_cumprod of a ComfyUI discrete model sampling (sigma = sqrt((1 - ac) / ac)); None if it has no table."""
    sigmas = getattr(model_sampling, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor) or sigmas.shape != (NUM_TRAIN_TIMESTEPS,):
        return None
    return 1.0 / (1.0 + sigmas.detach().double().cpu() ** 2)


def check_perflow_sampling(model_sampling, add_node_hint: str):
    """`model_sampling` if it is PeRFlow's on a table PeRFlow expects, or a flow model's own model sampling marked
    with its PeRFlow windows; a ValueError naming the node setting to change when it was replaced or sits on
    AnimateDiff's table; a logged warning for any other foreign table."""
    if flow_windows_of(model_sampling) is not None:
        return model_sampling  # a rectified-flow model keeps its own noise definition: nothing to compare
    if not isinstance(model_sampling, PeRFlowModelSampling):
        table = _table_of(model_sampling)
        name = "unknown" if table is None else table_name(table)
        if name not in ("sd", "unknown"):
            raise ValueError(
                f"PeRFlow's model sampling was replaced by a node after the PeRFlow node: this model now samples with "
                f"AnimateDiff-Evolved's '{name}' noise table ({type(model_sampling).__name__}), so the UNet would get "
                f"stock timesteps. Fix: {ANIMATEDIFF_FIX}; then the AnimateDiff nodes may sit before or after PeRFlow"
            )
        raise ValueError(
            f"This model is not set up for PeRFlow ({type(model_sampling).__name__}); {add_node_hint}. If it has one, "
            f"a node after it replaced PeRFlow's model sampling: {ANIMATEDIFF_FIX}, and put other model-sampling "
            "nodes (ModelSamplingDiscrete, ModelSamplingSD3, ModelSamplingFlux, ...) before the PeRFlow node"
        )
    name = table_name(model_sampling.alphas_cumprod)
    if name == "unknown":
        log.warning(
            "PeRFlow: the model sampling sits on a noise table that is not Stable Diffusion's scaled-linear one, "
            "which the published PeRFlow weights were trained on; a node before the PeRFlow node changed it. "
            "Fix: %s, or remove the model-sampling node before PeRFlow. Ignore this only if your PeRFlow "
            "weights were trained on this table.",
            ANIMATEDIFF_FIX,
        )
    elif name != "sd":
        raise ValueError(
            f"PeRFlow's model sampling sits on AnimateDiff-Evolved's '{name}' noise table instead of Stable "
            "Diffusion's scaled-linear one that PeRFlow was trained on: AnimateDiff's Use Evolved Sampling before "
            f"the PeRFlow node replaced the model sampling. Fix: {ANIMATEDIFF_FIX}"
        )
    return model_sampling


def perflow_windows(model_sampling, add_node_hint: str) -> tuple[int, float | None]:
    """(K, flow shift) of a checked PeRFlow model sampling; the shift is None for the SD family (PeRFlow's own t)."""
    model_sampling = check_perflow_sampling(model_sampling, add_node_hint)
    k = flow_windows_of(model_sampling)
    if k is None:
        return model_sampling.num_windows, None
    return k, flow_shift_of(model_sampling)
