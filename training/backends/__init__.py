"""Training backends: `toy` (the bundled toy UNet) and `comfy` (an SD checkpoint loaded by ComfyUI)."""

import argparse

import torch

from training.backends.base import Backend


def make_backend(args: argparse.Namespace, device: torch.device) -> Backend:
    """The teacher/student/data provider for --backend."""
    if args.backend == "toy":
        from training.backends.toy import ToyBackend
        from training.toy_data import DEFAULT_DATA

        return ToyBackend.from_files(args.teacher, args.data or DEFAULT_DATA, device, args.lora_rank, args.lora_alpha)
    from training.backends.comfy import ComfyBackend

    return ComfyBackend(args, device)
