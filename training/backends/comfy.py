"""Comfy backend: an SD1.5 / SD2.1 / SDXL, SD3 / SD3.5 or Flux checkpoint loaded by ComfyUI's own loader is the
teacher; its UNet (transformer) is trained. Images are VAE-encoded, captions encoded by its text encoders (SDXL:
pooled output + size conditioning; SD3 / Flux: pooled output as y; Flux dev: distilled guidance FLUX_GUIDANCE).

SD3 / Flux are rectified-flow models (time_kind "flow"): the teacher predicts the velocity at sigma, fed
ComfyUI's own timestep for it (model_sampling.timestep: SD3 sigma*1000, Flux sigma), the reflow solve is its own
Euler ODE per window (training.solvers.solve_teacher_flow), the windows sit at the shift of the checkpoint's own
model sampling (SD3: 3; Flux: exp(1.15), ComfyUI's default, = ModelSamplingFlux at 1024x1024) unless --flow-shift
says otherwise, and a LoRA (rank FLOW_LORA_RANK unless --lora-rank) is trained on the attention and MLP layers.

Data: training.dataset (image folder, JSONL manifest or WebDataset shards; buckets; bad samples skipped into
<out>/skipped.json), encoded live or read from a --cache-latents DIR (training.cache_latents).
"""

import argparse
import hashlib
import json
import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import replace
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist

from perflow_core.architecture import FLOW_ARCHITECTURES
from perflow_core.delta_format import state_dict_hash
from perflow_core.model_sampling import flow_shift_of
from perflow_core.schedule import sd_alphas_cumprod
from perflow_core.windows import NUM_TRAIN_TIMESTEPS
from training.backends.base import TeacherStudent
from training.cache_latents import ComfyEncoder, EncodedStream
from training.cli import UserError
from training.dataset import DataStream, SkipReport, fingerprint, gather, stream_config
from training.lora import COMFY_UNET_TARGETS, FLUX_TARGETS, MMDIT_TARGETS

log = logging.getLogger("perflow.train")
ARCHITECTURES = {
    "SD15": "sd15",
    "SD20": "sd21",
    "SD21UnclipL": "sd21",
    "SD21UnclipH": "sd21",
    "SDXL": "sdxl",
    "SD3": "sd3",  # SD3 and SD3.5 (Medium, Large): ComfyUI's MMDiT
    "Flux": "flux",  # Flux dev (guidance-distilled)
}
LORA_TARGETS = {"sd3": MMDIT_TARGETS, "flux": FLUX_TARGETS}
CHECKPOINT_BLOCKS = {"sd3": ("JointBlock",), "flux": ("DoubleStreamBlock", "SingleStreamBlock")}
FLOW_LORA_RANK = 32  # flow models train a LoRA unless --lora-rank says otherwise (full training of 2.5-12 B is rare)
FLUX_GUIDANCE = 3.5  # Flux dev's distilled guidance for teacher and student: ComfyUI's default (FluxGuidance 3.5)


def load_components(checkpoint: Path) -> tuple:
    """(ModelPatcher, CLIP, VAE) of a checkpoint file by ComfyUI's own loader."""
    import comfy.sd

    return tuple(comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)[:3])


def import_comfy(path: Path | None, device: torch.device) -> None:
    """Put ComfyUI on sys.path (--comfyui or $COMFYUI_PATH) and import it, CPU-only when training on CPU."""
    if "comfy.sd" in sys.modules:
        return
    root = path or (Path(os.environ["COMFYUI_PATH"]) if os.environ.get("COMFYUI_PATH") else None)
    if root is None or not (root / "comfy").is_dir():
        raise FileNotFoundError(f"ComfyUI not found at {root}: pass --comfyui PATH or set COMFYUI_PATH")
    sys.path.insert(0, str(root.resolve()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.sd  # noqa: F401


class ComfyBackend:
    """Teacher = the checkpoint's UNet (frozen), student = its float32 copy or, with --lora-rank, the same UNet with
    LoRA adapters (the teacher is it with the adapters off); conditioning dicts {context, y}."""

    checkpoint_blocks = ("ResBlock", "SpatialTransformer")
    delta_prefix = "diffusion_model."

    def __init__(self, args: argparse.Namespace, device: torch.device):
        import_comfy(args.comfyui, device)
        import comfy.model_base

        if args.checkpoint is None or not args.checkpoint.is_file():
            raise UserError(f"--checkpoint: base model file not found: {args.checkpoint}")
        if args.data is None:
            raise UserError("--data: an image folder or a .jsonl manifest is needed for --backend comfy")
        try:
            patcher, self.clip, self.vae = load_components(args.checkpoint)
        except Exception as e:  # noqa: BLE001 - ComfyUI raises many types for a file it cannot read
            raise UserError(
                f"{args.checkpoint}: ComfyUI cannot load it as a checkpoint ({e}); pass an SD1.5, SD2.1, SDXL, "
                "SD3 / SD3.5 or Flux dev .safetensors checkpoint with its text encoders and VAE"
            ) from None
        self.base = patcher.model
        name = type(self.base.model_config).__name__
        if name not in ARCHITECTURES:
            raise ValueError(
                f"{args.checkpoint}: a {name} model; the comfy backend trains SD1.5, SD2.1, SDXL, SD3 / SD3.5 and Flux "
                "dev"
            )
        if self.clip is None or self.vae is None:
            raise UserError(
                f"{args.checkpoint}: the file holds no {'text encoders' if self.clip is None else 'VAE'}; pass a "
                "checkpoint that includes them (for SD3.5 / Flux e.g. Comfy-Org's sd3.5_medium_incl_clips_t5xxlfp8"
                "scaled.safetensors or flux1-dev-fp8.safetensors)"
            )
        self.architecture = ARCHITECTURES[name]
        self.time_kind = "flow" if self.architecture in FLOW_ARCHITECTURES else "diffusion"
        self.flow_shift = 1.0
        self.v_prediction = self.base.model_type == comfy.model_base.ModelType.V_PREDICTION
        if self.time_kind == "flow":
            self.flow_shift = flow_shift_of(patcher.get_model_object("model_sampling"))  # the default --flow-shift
            self.alphas_cumprod = sd_alphas_cumprod()  # the Backend field; a flow solve does not read it
            if not args.lora_rank:
                log.info("%s is a flow-matching model: training a rank-%d LoRA (--lora-rank R to choose)", name,
                         FLOW_LORA_RANK)  # fmt: skip
                args.lora_rank = FLOW_LORA_RANK
            self.checkpoint_blocks = CHECKPOINT_BLOCKS[self.architecture]
            if self.architecture == "flux" and args.gradient_checkpointing:
                raise UserError(
                    "--gradient-checkpointing does not work with ComfyUI's Flux blocks (they add in place, so the "
                    "recomputed activations differ); leave it out, and lower --batch-size or --resolution for memory"
                )
        else:
            self.alphas_cumprod = (1 / (1 + self.base.model_sampling.sigmas.double().cpu() ** 2)).float()  # (1-a)/a
        self.device, self.resolution = device, args.resolution
        unet = self.base.diffusion_model.to(device)
        self.teacher_dtype = next(unet.parameters()).dtype
        if self.time_kind == "flow" and self.base.manual_cast_dtype is not None:  # fp8-stored weights: compute dtype
            self.teacher_dtype = self.base.manual_cast_dtype
        targets = LORA_TARGETS.get(self.architecture, COMFY_UNET_TARGETS)
        self.nets = TeacherStudent(unet, args.lora_rank, args.lora_alpha, targets)
        self.teacher, self.student = self.nets.teacher, self.nets.student
        self.student_dtype = self.teacher_dtype if self.nets.lora else torch.float32
        self.delta_dtype = torch.float16
        self.encoder = ComfyEncoder(self.base, self.clip, self.vae, args.checkpoint, self.architecture)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        cfg = stream_config(args, batch_size=args.batch_size // world, rank=rank, world=world, seed=args.seed)
        self.data = EncodedStream(self.encoder, cfg, args.cache_latents)
        self._batches, self._next = None, None  # the stream, started on first use (after a resume state is loaded)
        self._taken = self.data.stream.state_dict()  # data position after the last batch handed to the loop
        log.info("data %s: about %d samples (%s)", args.data, self.data.samples, self.architecture)
        self._preview: tuple[dict, dict] | None = None  # sample-grid conditioning, encoded on first use

    def __len__(self) -> int:
        return self.data.samples

    def _peek(self):
        if self._batches is None:
            self._batches = iter(self.data)
        if self._next is None:
            self._next = next(self._batches)
        return self._next

    def latent_shape(self) -> tuple[int, ...]:
        """[4, h, w] of the next training batch (its bucket)."""
        return tuple(self._peek()[0].shape[1:])

    def batch(self, idx: torch.Tensor):
        """(clean latents, conditioning, null conditioning) on the training device: the stream's next batch (its
        order, split and shuffling are training.dataset's; idx only gives the size)."""
        latents, cond, null = self._peek()
        if len(latents) != len(idx):
            raise ValueError(f"the data stream gives batches of {len(latents)}, the loop asked for {len(idx)}")
        self._next, self._taken = None, self.data.stream.state_dict()
        to = lambda d: {k: v.to(self.device) for k, v in self._guided(d, len(latents)).items()}  # noqa: E731
        return latents.to(self.device), to(cond), to(null)

    def _guided(self, cond: dict, n: int) -> dict:
        """Flux dev's conditioning carries its distilled guidance (FLUX_GUIDANCE) for every item."""
        if self.architecture != "flux":
            return cond
        return {**cond, "guidance": torch.full((n,), FLUX_GUIDANCE)}

    def data_state(self) -> list[dict]:
        """Every process's data position (the checkpoint keeps it; all processes must call this)."""
        return gather(self._taken)

    def load_data_state(self, states: list[dict]) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.data.stream.load_state_dict(states[rank])
        self._batches, self._next, self._taken = None, None, self.data.stream.state_dict()

    def write_skip_report(self, path: Path) -> None:
        """The samples skipped so far by every process, as a JSON file (all processes call; process 0 writes)."""
        report = SkipReport()
        for part in gather(self.data.stream.report.entries):
            report.add(part)
        if not dist.is_initialized() or dist.get_rank() == 0:
            report.write(path)

    def teacher_eps(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The teacher UNet at DDPM index round(t*1000) - 1 (published PFODESolver); v-prediction turned into eps.
        A flow model: its velocity eps - x0 at sigma t (ComfyUI's CONST output), as ComfyUI calls it."""
        if self.time_kind == "flow":
            with self.nets.teacher_mode():
                return self._flow_call(self.teacher, x, t, cond, self.teacher_dtype)
        idx = torch.clamp(torch.round(t * NUM_TRAIN_TIMESTEPS) - 1, min=0)
        dt = self.teacher_dtype
        with self.nets.teacher_mode():
            out = self.teacher(x.to(dt), timesteps=idx, context=cond["context"].to(dt), y=_opt(cond.get("y"), dt))
        out = out.float()
        if not self.v_prediction:
            return out
        a = self.alphas_cumprod.to(x.device, torch.float32)[idx.long()].reshape(-1, 1, 1, 1)
        return a.sqrt() * out + (1 - a).sqrt() * x  # eps = sqrt(a) v + sqrt(1 - a) x

    def student_fn(self, module):
        """The student sees t*1000 (PeRFlowModelSampling.timestep), as in the published training loop; a LoRA student
        computes in the base's dtype (its adapters in float32)."""
        dt = self.student_dtype
        if self.time_kind == "flow":  # the student sees ComfyUI's timestep for sigma t, as it will when sampled
            return lambda x, t, cond: self._flow_call(module, x, t, cond, dt)

        def forward(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
            c, y = cond["context"].to(dt), _opt(cond.get("y"), dt)
            return module(x.to(dt), timesteps=t * NUM_TRAIN_TIMESTEPS, context=c, y=y).float()

        return forward

    def _flow_call(self, module, x: torch.Tensor, sigma: torch.Tensor, cond: dict, dt: torch.dtype) -> torch.Tensor:
        """A flow transformer (MMDiT or Flux) at sigma [B]: ComfyUI's model_sampling.timestep(sigma) (SD3
        sigma*1000, Flux sigma), the raw latent (CONST calculate_input), context, pooled y and Flux's guidance."""
        timestep = self.base.model_sampling.timestep(sigma.float()).float()
        extra = {"guidance": cond["guidance"].float()} if "guidance" in cond else {}
        # ComfyUI's Flux blocks add in place (txt += ..., x += ...) onto tensors autograd has saved for the backward
        # pass (inference code); copies taken when they are saved keep the gradients exact.
        saved_copies = self.architecture == "flux" and torch.is_grad_enabled()
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, _same) if saved_copies else nullcontext():
            out = module(x.to(dt), timestep, context=cond["context"].to(dt), y=_opt(cond.get("y"), dt), **extra)
        return out.float()

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return self.nets.base_state_dict()

    def fingerprint(self) -> dict[str, str]:
        data = {**self.data.stream.cfg.resume_fields(), "units": fingerprint(self.data.stream.units)}
        return {
            "teacher_hash": state_dict_hash({k: v.cpu() for k, v in self.base_state_dict().items()}),
            "data_hash": hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest(),
        }

    def preview_conds(self, captions: int = 4) -> tuple[dict, dict]:
        """(conditioning, null conditioning) of the data's first `captions` captions (in file order), for the
        size of the next training batch, batched on the device."""
        if self._preview is None:
            cfg = replace(self.data.stream.cfg, shuffle=False, epochs=1, workers=0, batch_size=1, rank=0, world=1)
            first = islice(DataStream(cfg, self.data.stream.units), captions)
            texts = [b["caption"][0] for b in first]
            n, hw = len(texts), self.latent_shape()[1:]
            size, crop = [(hw[0] * 8, hw[1] * 8)] * n, [(0, 0)] * n
            cond = self.encoder.text_cond(*self.encoder.encode_text(texts), size, crop, size[0])
            null = self.data.null_cond(n, size, crop, hw)
            self._preview = (
                {k: v.to(self.device) for k, v in self._guided(cond, n).items()},
                {k: v.to(self.device) for k, v in self._guided(null, n).items()},
            )
        return self._preview

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The checkpoint's VAE: [B, H, W, 3] in [0, 1] -> [B, 3, H, W] in [-1, 1]."""
        return self.vae.decode(self.base.latent_format.process_out(latents)).float().movedim(-1, 1) * 2 - 1


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _opt(y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if y is None else y.to(dtype)
