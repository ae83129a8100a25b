"""Toy backend: a frozen ToyUNet teacher from a .safetensors file, the student its copy, data a uint8 image .npz."""

import copy
from pathlib import Path

import torch

from perflow_core.delta_format import state_dict_hash
from perflow_core.schedule import sd_alphas_cumprod
from training.cli import UserError
from training.toy_data import load_toy_data
from training.toy_model import load_toy_model


class ToyBackend:
    """Class-conditional toy: conditioning = labels, null conditioning = the extra class num_classes."""

    architecture = "toy"
    checkpoint_blocks = ("ResBlock",)
    delta_prefix = ""
    delta_dtype = torch.float32

    def __init__(self, teacher: Path, data: Path, device: torch.device):
        self.device = device
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format  # faster on CPU
        self.teacher = load_toy_model(teacher, device).requires_grad_(False).to(memory_format=self.memory_format)
        self.student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.alphas_cumprod = sd_alphas_cumprod()
        self.images, self.labels = load_toy_data(data)
        nc, ch = self.teacher.num_classes, self.teacher.config["in_channels"]
        if self.images.shape[1] != ch or self.images.shape[-1] % 4 or self.images.shape[-2] % 4:
            raise UserError(
                f"{data}: images {tuple(self.images.shape[1:])} do not fit the teacher {teacher} ({ch} channels, "
                "height and width divisible by 4)"
            )
        if len(self.labels) and int(self.labels.max()) >= nc:
            raise UserError(
                f"{data}: labels reach {int(self.labels.max())}; the teacher has {nc} classes (0..{nc - 1})"
            )
        self.null_class = nc

    def __len__(self) -> int:
        return len(self.images)

    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batch(self, idx: torch.Tensor):
        labels = self.labels[idx].to(self.device)
        images = self.images[idx].to(self.device).contiguous(memory_format=self.memory_format)
        return images, labels, torch.full_like(labels, self.null_class)

    def teacher_eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.teacher(x, t * 1000, cond)  # the toy teacher is fed t*1000 (noise level ac[t*1000 - 1])

    @staticmethod
    def student_fn(module):
        return lambda x, t, cond: module(x, t * 1000, cond)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return self.teacher.state_dict()

    def fingerprint(self) -> dict[str, str]:
        return {
            "teacher_hash": state_dict_hash({k: v.cpu() for k, v in self.base_state_dict().items()}),
            "data_hash": state_dict_hash({"images": self.images, "labels": self.labels}),
        }

    def preview_conds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every class twice."""
        labels = torch.arange(self.null_class, device=self.device).repeat(2)
        return labels, torch.full_like(labels, self.null_class)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
