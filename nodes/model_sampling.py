"""PeRFlow Model Sampling node: turns a merged PeRFlow checkpoint into a model that samples as PeRFlow."""

from ..perflow_core.model_sampling import PeRFlowModelSampling
from ..perflow_core.parameterization import PARAMETERIZATIONS

CATEGORY = "sampling/perflow"
ADD_SAMPLING_HINT = "add a 'PeRFlow Model Sampling' or 'PeRFlow Delta Loader' node after the checkpoint loader"


def perflow_model_sampling(model) -> PeRFlowModelSampling:
    """The model's PeRFlow sampling object, or a clear error naming the node to add."""
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, PeRFlowModelSampling):
        raise ValueError(f"This model is not set up for PeRFlow ({type(ms).__name__}); {ADD_SAMPLING_HINT}.")
    return ms


def with_perflow_sampling(model, parameterization: str, num_windows: int):
    """A clone of `model` whose model sampling is PeRFlow's, with the base model's own noise table."""
    base = model.get_model_object("model_sampling")
    if isinstance(base, PeRFlowModelSampling):
        alphas_cumprod = base.alphas_cumprod
    else:
        sigmas = getattr(base, "sigmas", None)
        if sigmas is None or sigmas.ndim != 1 or len(sigmas) != 1000 or float(sigmas[0]) <= 0:
            raise ValueError(
                f"PeRFlow needs a Stable Diffusion 1.5 / 2.1 / XL model (1000-step discrete noise table); "
                f"this model uses {type(base).__name__}. Load an SD-family checkpoint."
            )
        alphas_cumprod = 1.0 / (1.0 + sigmas.float().cpu() ** 2)  # ComfyUI stores sigma = sqrt((1 - ac) / ac)
    m = model.clone()
    m.add_object_patch("model_sampling", PeRFlowModelSampling(parameterization, num_windows, alphas_cumprod))
    return m


class PeRFlowModelSamplingNode:
    DESCRIPTION = (
        "Makes a merged PeRFlow model (weights already PeRFlow) sample as Piecewise Rectified Flow: the UNet gets "
        "t*1000 and the raw latent, and each step moves along a straight line inside its time window. Use the "
        "'perflow' sampler and scheduler (or 'euler'). For a base model plus PeRFlow delta use PeRFlow Delta Loader."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with PeRFlow model sampling; the input model is left unchanged.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A merged PeRFlow model (SD1.5, SD2.1 or SDXL family)."}),
                "parameterization": (
                    list(PARAMETERIZATIONS),
                    {
                        "default": "diff_eps",
                        "tooltip": "How the network output is read: diff_eps (published SD1.5 deltas), "
                        "ddim_eps (published SDXL models), velocity (published SD2.1 model).",
                    },
                ),
                "num_windows": (
                    "INT",
                    {"default": 4, "min": 1, "max": 16, "tooltip": "Time windows K the model was trained with (4)."},
                ),
            }
        }

    def patch(self, model, parameterization, num_windows):
        return (with_perflow_sampling(model, parameterization, num_windows),)
