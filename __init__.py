"""ComfyUI-PeRFlow: Piecewise Rectified Flow sampling, delta loading and training for ComfyUI."""

import logging

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.delta_loader import register_folder
from .nodes.sampler import register_sampler_and_scheduler

register_folder()  # models/perflow, listed by the Delta Loader
try:
    register_sampler_and_scheduler()
except (ImportError, AttributeError) as e:  # an older or changed ComfyUI: the dedicated nodes still work
    logging.getLogger("perflow").warning("PeRFlow: could not add 'perflow' to the KSampler lists: %s", e)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
