"""ComfyUI-PeRFlow: Piecewise Rectified Flow sampling, delta loading and training for ComfyUI (V3 nodes).

Exports only comfy_entrypoint: ComfyUI ignores comfy_entrypoint in a module that also has NODE_CLASS_MAPPINGS.
"""

from .nodes.common import comfyui_too_old, log

_too_old = comfyui_too_old()
if _too_old:  # one clear line at start-up instead of an ImportError here or an AttributeError mid-prompt
    log.error(_too_old)
else:
    from .nodes.extension import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
