"""PeRFlow CFG Schedule node: a guidance scale per time window, with the unconditional pass skipped at 1.0."""

from comfy_api.latest import io

from ..perflow_core.cfg_schedule import cfg_at, parse_cfg_list, ramp_cfg_scales, window_cfg_scales
from .common import CATEGORY, model_windows, schema


def with_cfg_schedule(model, scales: list[float], flow_shift: float | None = None):
    """A clone of `model` whose guider uses scales[window of t] at each step (PREDICT_NOISE wrapper); flow_shift
    places the windows in a rectified-flow model's sigma."""
    import comfy.patcher_extension

    def per_window_cfg(executor, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        guider = executor.class_obj
        cfg = guider.cfg
        guider.cfg = cfg_at(scales, timestep, flow_shift)  # exactly 1.0 lets ComfyUI skip the unconditional pass
        try:
            return executor(x, timestep, model_options, seed)
        finally:
            guider.cfg = cfg

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "perflow_cfg_schedule", per_window_cfg)
    return m


class PeRFlowCFGSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="PeRFlowCFGSchedule",
            display_name="PeRFlow CFG Schedule",
            category=CATEGORY,
            search_aliases=["cfg schedule", "guidance schedule", "per-window cfg"],
            description="Per-window classifier-free guidance for PeRFlow models. Replaces the sampler's cfg value. "
            "Windows whose scale is exactly 1.0 skip the unconditional pass, so '7,1,1,1' costs 5 UNet evaluations "
            "instead of 8 at 4 steps. Works with KSampler, SamplerCustom and any CFGGuider-based node. SD3: real "
            "CFG per window. Flux dev: its distilled guidance (FluxGuidance) stays as set in every window; scales "
            "above 1 add real CFG on top of it (two passes), 1.0 keeps one pass per step.",
            inputs=[
                io.Model.Input("model", tooltip="A PeRFlow model (after PeRFlow Model Sampling or Delta Loader)."),
                io.Combo.Input(
                    "mode",
                    options=["list", "ramp"],
                    tooltip="list: the values in cfg_list; ramp: from ramp_start (first window) to ramp_end.",
                ),
                io.String.Input(
                    "cfg_list",
                    default="7,1,1,1",
                    tooltip="One scale for all windows ('5') or one per window, noisiest first ('7,5,3,1'); a short "
                    "list repeats its last value.",
                ),
                io.Float.Input(
                    "ramp_start", default=7.0, min=0.0, max=100.0, step=0.1, tooltip="Scale in the first window."
                ),
                io.Float.Input(
                    "ramp_end", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="Scale in the last window."
                ),
            ],
            outputs=[
                io.Model.Output(
                    tooltip="The model with the guidance schedule attached; the input model is left unchanged."
                )
            ],
        )

    @classmethod
    def execute(cls, model, mode, cfg_list, ramp_start, ramp_end) -> io.NodeOutput:
        num_windows, flow_shift = model_windows(model)
        if mode == "ramp":
            scales = ramp_cfg_scales(ramp_start, ramp_end, num_windows)
        else:
            scales = window_cfg_scales(parse_cfg_list(cfg_list), num_windows)
        return io.NodeOutput(with_cfg_schedule(model, scales, flow_shift))
