"""PeRFlow Scheduler and Sampler nodes, and the 'perflow' entries in the stock sampler/scheduler dropdowns."""

from comfy_api.latest import io

from ..perflow_core.flow_windows import flow_sigmas
from ..perflow_core.sampling import sample_perflow
from ..perflow_core.sampling_guard import check_perflow_sampling, perflow_windows
from ..perflow_core.schedule import perflow_sigmas, stock_scheduler_sigmas
from .common import ADD_SAMPLING_HINT, SAMPLER_CATEGORY, SCHEDULER_CATEGORY, log, model_windows, schema


def scheduler_sigmas(model_sampling, steps: int):
    """The stock-scheduler handler: PeRFlow's schedule for a PeRFlow-patched model (SD family or rectified flow,
    the latter at its model sampling's own shift), a clear error otherwise."""
    return stock_scheduler_sigmas(steps, *perflow_windows(model_sampling, ADD_SAMPLING_HINT))


def sample_perflow_checked(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """sample_perflow after checking the model sampling in use (model.inner_model.inner_model is the BaseModel):
    a node after PeRFlow may have replaced it (AnimateDiff-Evolved's beta_schedule)."""
    check_perflow_sampling(model.inner_model.inner_model.model_sampling, ADD_SAMPLING_HINT)
    return sample_perflow(model, x, sigmas, extra_args, callback, disable)


def register_sampler_and_scheduler() -> None:
    """Add 'perflow' to KSampler's sampler and scheduler lists (idempotent)."""
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers as cs

    kds.sample_perflow = sample_perflow_checked  # ksampler("perflow") looks up sample_perflow here
    for names in (cs.KSAMPLER_NAMES, cs.SAMPLER_NAMES):
        if "perflow" not in names:
            names.append("perflow")
    if not hasattr(cs, "SCHEDULER_HANDLERS"):
        log.warning("PeRFlow: this ComfyUI has no SCHEDULER_HANDLERS; use the PeRFlow Scheduler node instead.")
        return
    if "perflow" not in cs.SCHEDULER_HANDLERS:
        cs.SCHEDULER_HANDLERS["perflow"] = cs.SchedulerHandler(scheduler_sigmas, use_ms=True)
    if "perflow" not in cs.SCHEDULER_NAMES:
        cs.SCHEDULER_NAMES.append("perflow")


class PeRFlowScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="PeRFlowScheduler",
            display_name="PeRFlow Scheduler",
            category=SCHEDULER_CATEGORY,
            search_aliases=["sigmas", "schedule"],
            description="PeRFlow's step schedule (the published set_timesteps): steps spread over the model's time "
            "windows, noisiest windows first. Steps below the window count are raised to it. denoise < 1 keeps the "
            "tail of a longer schedule, as ComfyUI's schedulers do, for img2img. For a rectified-flow model (SD3, "
            "Flux) the windows and steps are in its own sigma, with the shift of its model sampling.",
            inputs=[
                io.Model.Input("model", tooltip="A PeRFlow model; its time windows set the schedule."),
                io.Int.Input("steps", default=4, min=1, max=1000, tooltip="Sampling steps; one per window is enough."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Below 1 for img2img."),
            ],
            outputs=[io.Sigmas.Output(tooltip="Descending PeRFlow times t (1 = noise) ending in 0.")],
        )

    @classmethod
    def execute(cls, model, steps, denoise) -> io.NodeOutput:
        num_windows, flow_shift = model_windows(model)
        if flow_shift is None:
            return io.NodeOutput(perflow_sigmas(steps, num_windows, denoise))
        return io.NodeOutput(flow_sigmas(steps, num_windows, flow_shift, denoise))


class PeRFlowSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="PeRFlowSampler",
            display_name="PeRFlow Sampler",
            category=SAMPLER_CATEGORY,
            search_aliases=["sampler", "euler"],
            description="The PeRFlow sampler: one straight-line (Euler) step per schedule entry, exactly the "
            "published step (for SD3 / Flux: the model's own Euler step).",
            inputs=[],
            outputs=[io.Sampler.Output(tooltip="A sampler for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        import comfy.samplers

        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_perflow_checked))
