"""Comfy backend: an SD1.5 / SD2.1 / SDXL checkpoint loaded by ComfyUI's own loader is the teacher; its UNet is
trained. Images are VAE-encoded, captions encoded by its text encoders (SDXL: pooled output + size conditioning).

Data: a folder of images with same-name .txt captions, or a JSONL manifest of {"image": path, "caption": text}
(relative paths resolve against the manifest's folder). Unreadable images are skipped and counted.
"""

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch

from perflow_core.delta_format import state_dict_hash
from perflow_core.windows import NUM_TRAIN_TIMESTEPS
from training.backends.base import TeacherStudent
from training.cli import UserError
from training.lora import COMFY_UNET_TARGETS

log = logging.getLogger("perflow.train")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
ARCHITECTURES = {"SD15": "sd15", "SD20": "sd21", "SD21UnclipL": "sd21", "SD21UnclipH": "sd21", "SDXL": "sdxl"}


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


def scan_items(data: Path) -> list[tuple[Path, str]]:
    """(image path, caption) from a folder (caption = same-name .txt, else "") or a .jsonl manifest."""
    if data.suffix == ".jsonl":
        items = []
        for n, line in enumerate(data.read_text().splitlines(), 1):
            if line.strip():
                rec = json.loads(line)
                if "image" not in rec:
                    raise ValueError(f"{data}:{n}: a manifest line needs an 'image' entry")
                items.append((data.parent / rec["image"], str(rec.get("caption", rec.get("text", "")))))
        return items
    if not data.is_dir():
        raise FileNotFoundError(f"--data must be an image folder or a .jsonl manifest; got {data}")
    images = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    return [(p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else "") for p in images]


def load_image(path: Path, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """RGB [H, W, 3] in [0, 1] resized (shorter side) and center-cropped; also (orig h, w) and (crop top, left)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return pixels.float() / 255.0, (h, w), (top, left)


class ComfyBackend:
    """Teacher = the checkpoint's UNet (frozen), student = its float32 copy or, with --lora-rank, the same UNet with
    LoRA adapters (the teacher is it with the adapters off); conditioning dicts {context, y}."""

    checkpoint_blocks = ("ResBlock", "SpatialTransformer")
    delta_prefix = "diffusion_model."

    def __init__(self, args: argparse.Namespace, device: torch.device):
        import_comfy(args.comfyui, device)
        import comfy.model_base
        import comfy.sd

        if args.checkpoint is None or not args.checkpoint.is_file():
            raise UserError(f"--checkpoint: base model file not found: {args.checkpoint}")
        if args.data is None:
            raise UserError("--data: an image folder or a .jsonl manifest is needed for --backend comfy")
        try:
            out = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True, output_clip=True)
        except Exception as e:  # noqa: BLE001 - ComfyUI raises many types for a file it cannot read
            raise UserError(
                f"{args.checkpoint}: ComfyUI cannot load it as a checkpoint ({e}); pass an SD1.5, SD2.1 "
                "or SDXL .safetensors checkpoint"
            ) from None
        patcher, self.clip, self.vae = out[0], out[1], out[2]
        self.base = patcher.model
        name = type(self.base.model_config).__name__
        if name not in ARCHITECTURES:
            raise ValueError(f"{args.checkpoint}: a {name} model; the comfy backend trains SD1.5, SD2.1 and SDXL")
        self.architecture = ARCHITECTURES[name]
        self.v_prediction = self.base.model_type == comfy.model_base.ModelType.V_PREDICTION
        self.alphas_cumprod = (1 / (1 + self.base.model_sampling.sigmas.double().cpu() ** 2)).float()  # s^2 = (1-a)/a
        self.device, self.resolution = device, args.resolution
        unet = self.base.diffusion_model.to(device)
        self.teacher_dtype = next(unet.parameters()).dtype
        self.nets = TeacherStudent(unet, args.lora_rank, args.lora_alpha, COMFY_UNET_TARGETS)
        self.teacher, self.student = self.nets.teacher, self.nets.student
        self.student_dtype = self.teacher_dtype if self.nets.lora else torch.float32
        self.delta_dtype = torch.float16
        self.items, self.skipped = [], 0
        for path, caption in scan_items(args.data):
            try:
                self.items.append((path, caption, *load_image(path, args.resolution)[1:]))
            except Exception as e:  # noqa: BLE001 - any unreadable image is skipped, never fatal
                self.skipped += 1
                log.warning("skipping unreadable image %s (%s)", path, e.__class__.__name__)
        log.info("%d images, %d skipped as unreadable (%s)", len(self.items), self.skipped, self.architecture)
        self.null = self._encode_text("", (args.resolution, args.resolution), (0, 0))
        self.cache = [self._encode_item(i) for i in range(len(self.items))] if args.cache_latents else None
        self._preview: tuple[dict, dict] | None = None  # sample-grid conditioning, encoded on first use

    def __len__(self) -> int:
        return len(self.items)

    def latent_shape(self) -> tuple[int, ...]:
        return (4, self.resolution // 8, self.resolution // 8)

    @torch.no_grad()
    def _encode_text(self, caption: str, orig: tuple[int, int], crop: tuple[int, int]) -> dict:
        """{context [1, 77, D]} (first 77-token chunk), plus SDXL's y = pooled text + size/crop embedding."""
        tokens = {k: v[:1] for k, v in self.clip.tokenize(caption).items()}
        context, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        cond = {"context": context.float().cpu()}
        if self.architecture == "sdxl":
            res = self.resolution
            y = self.base.encode_adm(
                pooled_output=pooled, width=orig[1], height=orig[0], crop_w=crop[1], crop_h=crop[0],
                target_width=res, target_height=res,
            )  # fmt: skip
            cond["y"] = y.float().cpu()
        return cond

    @torch.no_grad()
    def _encode_item(self, i: int) -> tuple[torch.Tensor, dict]:
        """(scaled latent [1, 4, h, w], conditioning) of item i."""
        path, caption, orig, crop = self.items[i]
        pixels = load_image(path, self.resolution)[0][None]
        latent = self.base.latent_format.process_in(self.vae.encode(pixels)).float().cpu()
        return latent, self._encode_text(caption, orig, crop)

    def batch(self, idx: torch.Tensor):
        """(clean latents, conditioning, null conditioning) on the training device."""
        rows = [self.cache[i] if self.cache is not None else self._encode_item(i) for i in idx.tolist()]
        latents = torch.cat([r[0] for r in rows]).to(self.device)
        cond = {k: torch.cat([r[1][k] for r in rows]).to(self.device) for k in rows[0][1]}
        null = {k: v.expand(len(rows), *v.shape[1:]).to(self.device) for k, v in self.null.items()}
        return latents, cond, null

    def teacher_eps(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The teacher UNet at DDPM index round(t*1000) - 1 (published PFODESolver); v-prediction turned into eps."""
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

        def forward(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
            c, y = cond["context"].to(dt), _opt(cond.get("y"), dt)
            return module(x.to(dt), timesteps=t * NUM_TRAIN_TIMESTEPS, context=c, y=y).float()

        return forward

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return self.nets.base_state_dict()

    def fingerprint(self) -> dict[str, str]:
        items = [[p.name, c, list(o), list(cr), p.stat().st_size] for p, c, o, cr in self.items]
        return {
            "teacher_hash": state_dict_hash({k: v.cpu() for k, v in self.base_state_dict().items()}),
            "data_hash": hashlib.sha256(json.dumps([self.resolution, items]).encode()).hexdigest(),
        }

    def preview_conds(self, captions: int = 4) -> tuple[dict, dict]:
        """(conditioning, null conditioning) of the first `captions` dataset captions, batched on the device."""
        if self._preview is None:
            rows = [self._encode_text(c, orig, crop) for _, c, orig, crop in self.items[:captions]]
            cond = {k: torch.cat([r[k] for r in rows]).to(self.device) for k in rows[0]}
            null = {k: v.expand(len(rows), *v.shape[1:]).to(self.device) for k, v in self.null.items()}
            self._preview = (cond, null)
        return self._preview

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The checkpoint's VAE: [B, H, W, 3] in [0, 1] -> [B, 3, H, W] in [-1, 1]."""
        return self.vae.decode(self.base.latent_format.process_out(latents)).float().movedim(-1, 1) * 2 - 1


def _opt(y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if y is None else y.to(dtype)
