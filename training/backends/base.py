"""What the training loop asks of a backend (the toy UNet, a ComfyUI checkpoint, ...)."""

import copy
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

import torch

from training.solvers import Cond, EpsFn


class Backend(Protocol):
    """Teacher, student, data and previews of one model family. Times t are in [0, 1] per item, t = 1 noisiest."""

    architecture: str  # base_architecture of the files written (toy, sd15, sd21, sdxl)
    device: torch.device
    student: torch.nn.Module  # the network under training (starts equal to the teacher)
    alphas_cumprod: torch.Tensor  # the teacher's noise table
    checkpoint_blocks: tuple[str, ...]  # class names recomputed under --gradient-checkpointing
    delta_prefix: str  # key prefix of the delta file ("diffusion_model." for ComfyUI UNet names)
    delta_dtype: torch.dtype
    time_kind: str  # "diffusion" (an eps/v teacher on alphas_cumprod) or "flow" (a velocity teacher at sigma)
    flow_shift: float  # flow teachers: the time shift of their own sampler (the default --flow-shift); else 1.0

    def __len__(self) -> int:
        """Number of training items."""

    def latent_shape(self) -> tuple[int, ...]:
        """[C, H, W] of one training latent."""

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, Cond, Cond]:
        """(clean latents, conditioning, null conditioning) of dataset items idx, on the device."""

    def teacher_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The frozen teacher's eps prediction."""

    def student_fn(self, module) -> EpsFn:
        """The student's forward as f(x, t, cond), for `module` (the student, its DDP wrapper or a functional call)."""

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's weights under the student's state-dict names (delta = student - base)."""

    def fingerprint(self) -> dict[str, str]:
        """Hashes of what a resumed run must share with the original: the teacher weights and the data."""

    def preview_conds(self) -> tuple[Cond, Cond]:
        """(conditioning, null conditioning) of the sample-grid items, on the device."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [N, C, H, W] in [-1, 1] for the sample grid."""

    def data_state(self) -> object:
        """The data position a checkpoint keeps for an exact resume (None where the step number alone fixes it).
        Every process calls it."""

    def load_data_state(self, state: object) -> None:
        """Continue the data from a checkpoint's data_state() value (before the first batch)."""

    def write_skip_report(self, path: Path) -> None:
        """Write the samples skipped so far, and why, to path (JSON); nothing where no sample can be bad.
        Every process calls it."""


class TeacherStudent:
    """The two networks of a run. Full training: the frozen network and a float32 trainable copy. LoRA training
    (rank > 0): one network, peft adapters on `lora_targets` trainable, and the teacher is that network with its
    adapters switched off, so one UNet is in memory."""

    def __init__(self, net: torch.nn.Module, lora_rank: int = 0, lora_alpha: float | None = None, lora_targets=()):
        self.lora = lora_rank > 0
        if self.lora:
            from training.lora import add_adapters

            add_adapters(net, lora_rank, lora_alpha, lora_targets)
            self.teacher = self.student = net.train()
        else:
            self.teacher = net.requires_grad_(False).eval()
            self.student = copy.deepcopy(net).float().train().requires_grad_(True)

    def teacher_mode(self) -> AbstractContextManager:
        """The block in which calls of `teacher` compute the frozen base."""
        if not self.lora:
            return nullcontext()
        from training.lora import adapters_disabled

        return adapters_disabled(self.teacher)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen base weights under their original names."""
        if not self.lora:
            return self.teacher.state_dict()
        from training.lora import base_state_dict

        return base_state_dict(self.teacher)
