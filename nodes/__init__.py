"""ComfyUI nodes (V3 schema): thin wrappers over perflow_core. ComfyUI loads them through extension.comfy_entrypoint."""
