"""ComfyUI nodes: thin wrappers over perflow_core."""

from .cfg_schedule import PeRFlowCFGSchedule
from .delta_loader import PeRFlowDeltaLoader
from .model_sampling import PeRFlowModelSamplingNode
from .sampler import PeRFlowSampler, PeRFlowScheduler

NODE_CLASS_MAPPINGS = {
    "PeRFlowModelSampling": PeRFlowModelSamplingNode,
    "PeRFlowScheduler": PeRFlowScheduler,
    "PeRFlowSampler": PeRFlowSampler,
    "PeRFlowCFGSchedule": PeRFlowCFGSchedule,
    "PeRFlowDeltaLoader": PeRFlowDeltaLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PeRFlowModelSampling": "PeRFlow Model Sampling",
    "PeRFlowScheduler": "PeRFlow Scheduler",
    "PeRFlowSampler": "PeRFlow Sampler",
    "PeRFlowCFGSchedule": "PeRFlow CFG Schedule",
    "PeRFlowDeltaLoader": "PeRFlow Delta Loader",
}
