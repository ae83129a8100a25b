"""Toy backend: a ToyUNet teacher from a .safetensors file, data a uint8 image .npz (training/toy_data.py)."""

from pathlib import Path

import torch

from perflow_core.delta_format import state_dict_hash
from perflow_core.schedule import sd_alphas_cumprod
from training.backends.base import TeacherStudent
from training.cli import UserError
from training.toy_data import load_toy_data
from training.toy_model import ToyUNet, load_toy_model, toy_time_kind

# The published LoRA roles in the ToyUNet: ResBlock conv1/conv2/skip/emb (time_emb_proj) and the strided pool convs.
TOY_LORA_TARGETS = (r"\.conv[12]$", r"\.skip$", r"\.emb$", r"^pool[12]$")


class ToyBackend:
    """Class-conditional toy: conditioning = labels, null conditioning = the extra class num_classes. The teacher
    predicts eps at t (time_kind "diffusion") or the velocity eps - x0 at sigma (time_kind "flow"), fed t*1000."""

    architecture = "toy"
    checkpoint_blocks = ("ResBlock",)
    delta_prefix = ""
    delta_dtype = torch.float32

    def __init__(
        self,
        teacher: ToyUNet,
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        time_kind: str = "diffusion",
    ):
        self.time_kind = time_kind
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        net = teacher.to(self.device, memory_format=self.memory_format)
        self.nets = TeacherStudent(net, lora_rank, lora_alpha, TOY_LORA_TARGETS)
        self.teacher, self.student = self.nets.teacher, self.nets.student
        self.alphas_cumprod = sd_alphas_cumprod()
        self.images, self.labels = images, labels
        self.null_class = teacher.num_classes

    @classmethod
    def from_files(cls, teacher: Path, data: Path, device: torch.device, lora_rank=0, lora_alpha=None):
        """Load the teacher and the data; refuse data that does not fit the teacher (channels, size, labels)."""
        net, time_kind = load_toy_model(teacher), toy_time_kind(teacher)
        images, labels = load_toy_data(data)
        nc, ch = net.num_classes, net.config["in_channels"]
        if images.shape[1] != ch or images.shape[-1] % 4 or images.shape[-2] % 4:
            raise UserError(
                f"{data}: images {tuple(images.shape[1:])} do not fit the teacher {teacher} ({ch} channels, height "
                "and width divisible by 4)"
            )
        if len(labels) and int(labels.max()) >= nc:
            top = int(labels.max())
            raise UserError(f"{data}: labels reach {top}; the teacher {teacher} has {nc} classes (0..{nc - 1})")
        return cls(net, images, labels, device, lora_rank, lora_alpha, time_kind)

    def __len__(self) -> int:
        return len(self.images)

    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batch(self, idx: torch.Tensor):
        labels = self.labels[idx].to(self.device)
        images = self.images[idx].to(self.device).contiguous(memory_format=self.memory_format)
        return images, labels, torch.full_like(labels, self.null_class)

    def teacher_eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with self.nets.teacher_mode():
            return self.teacher(x, t * 1000, cond)  # fed t*1000 (noise level ac[t*1000 - 1]; flow: sigma*1000)

    @staticmethod
    def student_fn(module):
        return lambda x, t, cond: module(x, t * 1000, cond)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return self.nets.base_state_dict()

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

    def data_state(self) -> None:
        """None: a step's items are fixed by (seed, step) (training.engine.batch_indices)."""

    def load_data_state(self, state: None) -> None:
        pass

    def write_skip_report(self, path: Path) -> None:
        """No report: the toy data are decoded arrays, none can be skipped."""
