"""The V3 extension ComfyUI loads: the node list, and the set-up done once when the pack is loaded."""

from comfy_api.latest import ComfyExtension, io

from .cfg_schedule import PeRFlowCFGSchedule
from .common import log
from .delta_loader import PeRFlowDeltaLoader, register_folder
from .model_sampling import PeRFlowModelSampling
from .sampler import PeRFlowSampler, PeRFlowScheduler, register_sampler_and_scheduler

NODES = [PeRFlowModelSampling, PeRFlowDeltaLoader, PeRFlowScheduler, PeRFlowSampler, PeRFlowCFGSchedule]


class PeRFlowExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> PeRFlowExtension:
    """Called once by ComfyUI's loader: create models/perflow, add 'perflow' to the stock lists, list the nodes."""
    register_folder()
    try:
        register_sampler_and_scheduler()
    except (ImportError, AttributeError) as e:  # a changed ComfyUI: the dedicated nodes still work
        log.warning("PeRFlow: could not add 'perflow' to the KSampler lists: %s", e)
    return PeRFlowExtension()
