"""ComfyUI-PeRFlow: Piecewise Rectified Flow sampling, delta loading and training for ComfyUI."""

import logging

# ComfyUI imports this file as a package. A bare import (a tool scanning the checkout, whose folder name such as
# ComfyUI-PeRFlow is no identifier) does nothing; tests/pytest.ini keeps pytest itself away from this file.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes.delta_loader import register_folder
    from .nodes.sampler import register_sampler_and_scheduler

    register_folder()  # models/perflow, listed by the Delta Loader
    try:
        register_sampler_and_scheduler()
    except (ImportError, AttributeError) as e:  # an older or changed ComfyUI: the dedicated nodes still work
        logging.getLogger("perflow").warning("PeRFlow: could not add 'perflow' to the KSampler lists: %s", e)

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
