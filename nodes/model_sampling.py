"""PeRFlow Model Sampling node: turns a merged PeRFlow checkpoint into a model that samples as PeRFlow."""

from comfy_api.latest import io

from ..perflow_core.parameterization import PARAMETERIZATIONS
from .common import CATEGORY, schema, with_perflow_sampling


class PeRFlowModelSampling(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="PeRFlowModelSampling",
            display_name="PeRFlow Model Sampling",
            category=CATEGORY,
            search_aliases=["model sampling", "merged perflow"],
            description="Makes a merged PeRFlow model (weights already PeRFlow) sample as Piecewise Rectified Flow: "
            "the UNet gets t*1000 and the raw latent, and each step moves along a straight line inside its time "
            "window. Use the 'perflow' sampler and scheduler (or 'euler'). For a base model plus PeRFlow delta use "
            "PeRFlow Delta Loader. On a rectified-flow model (SD3, Flux; parameterization velocity) the model keeps "
            "its own model sampling and shift (put ModelSamplingSD3 / ModelSamplingFlux before this node) and "
            "gains the K windows the PeRFlow schedule and CFG schedule use.",
            inputs=[
                io.Model.Input("model", tooltip="A merged PeRFlow model (SD1.5, SD2.1, SDXL, SD3 or Flux family)."),
                io.Combo.Input(
                    "parameterization",
                    options=list(PARAMETERIZATIONS),
                    default="diff_eps",
                    tooltip="How the network output is read: diff_eps (published SD1.5 deltas), ddim_eps "
                    "(published SDXL models), velocity (published SD2.1 model; every SD3 / Flux PeRFlow model).",
                ),
                io.Int.Input(
                    "num_windows", default=4, min=1, max=16, tooltip="Time windows K the model was trained with (4)."
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with PeRFlow model sampling; the input model is left unchanged.")
            ],
        )

    @classmethod
    def execute(cls, model, parameterization, num_windows) -> io.NodeOutput:
        return io.NodeOutput(with_perflow_sampling(model, parameterization, num_windows))
