"""VAE latents and text embeddings of a data set, computed once and streamed back as shards (--cache-latents DIR).

    python -m training.cache_latents --checkpoint base.safetensors --data 'shards/{00000..00099}.tar' \\
        --cache-latents cache/ --resolution 1024 --buckets sdxl
    accelerate launch --num_processes 8 -m training.cache_latents ...   # the same on 8 processes / GPUs

A cache lives in DIR/<key>/, key = hash of everything an entry depends on: the checkpoint file's sha256, the
encoder settings (ENCODER_VERSION, architecture, stored dtype), the data fingerprint (every shard's or image's
path, size and mtime, and every folder/manifest caption), the resolution, the buckets and the decoding
settings. A change to any of them is a new key, so a stale entry is never read; an old key's folder is left
alone (delete it when you like). Each process encodes its part of the data (the split of training.dataset,
in order) and deals the samples round-robin over at least 16 tar shards r<rank>-<n>.tar of at most
--cache-shard-size samples (so that training can use DataLoader workers). A sample is key.safetensors
(latent = the raw VAE output, context, pooled, size, crop; float16 / int64) + key.txt (the caption).
manifest.json, written last by process 0, marks the cache complete; a folder without it is an interrupted
build and is rebuilt. Skipped samples are listed in DIR/<key>/skipped.json.

The trainer streams a complete cache through training.dataset.DataStream (latents=True) with the same
shuffling, splitting and exact resume as images; a batch never mixes latent sizes (buckets).
"""

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch

from training.dataset import (
    DataStream,
    SkipReport,
    StreamConfig,
    Unit,
    estimate_samples,
    fingerprint,
    fit_workers,
    gather,
    scan_units,
)  # fmt: skip

log = logging.getLogger("perflow.cache")
ENCODER_VERSION = 1  # bump when what an entry holds, or how it is computed, changes
STORED_DTYPE = torch.float16
MIN_SHARDS = 16  # per process


class ComfyEncoder:
    """The checkpoint's VAE and text encoders (ComfyUI's loader) applied to DataStream image batches."""

    def __init__(self, base, clip, vae, checkpoint: Path, architecture: str):
        self.base, self.clip, self.vae, self.checkpoint = base, clip, vae, checkpoint
        self.architecture = architecture  # sd15, sd21 or sdxl
        self._hash: str | None = None

    @classmethod
    def load(cls, checkpoint: Path) -> "ComfyEncoder":
        """From a checkpoint file (ComfyUI must be imported: training.comfy_backend.import_comfy)."""
        import comfy.sd

        from training.backends.comfy import ARCHITECTURES

        if not checkpoint.is_file():
            raise FileNotFoundError(f"--checkpoint: base model file not found: {checkpoint}")
        patcher, clip, vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True)[:3]
        name = type(patcher.model.model_config).__name__
        if name not in ARCHITECTURES:
            raise ValueError(f"{checkpoint}: a {name} model; SD1.5, SD2.1 and SDXL checkpoints are supported")
        return cls(patcher.model, clip, vae, checkpoint, ARCHITECTURES[name])

    def checkpoint_hash(self) -> str:
        """sha256 of the checkpoint file (VAE, text encoders and UNet: everything an entry depends on)."""
        if self._hash is None:
            h = hashlib.sha256()
            with open(self.checkpoint, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            self._hash = h.hexdigest()
        return self._hash

    def settings(self) -> dict:
        """What an entry depends on besides the data and the geometry."""
        return {
            "encoder_version": ENCODER_VERSION,
            "architecture": self.architecture,
            "checkpoint_sha256": self.checkpoint_hash(),
            "text": "first 77-token chunk, final layer",
            "stored_dtype": str(STORED_DTYPE),
        }

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, 77, D], pooled [B, P]) of the first 77-token chunk of each caption, float32 on the CPU."""
        ctx, pooled = [], []
        for caption in captions:
            tokens = {k: v[:1] for k, v in self.clip.tokenize(caption).items()}
            c, p = self.clip.encode_from_tokens(tokens, return_pooled=True)
            ctx.append(c.float().cpu())
            pooled.append(p.float().cpu())
        return torch.cat(ctx), torch.cat(pooled)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents [B, 4, h, w] (before the model's latent scaling) of uint8 pixels [B, H, W, 3]."""
        return self.vae.encode(pixels.float() / 255.0).float().cpu()

    def entries(self, batch: dict) -> dict[str, torch.Tensor]:
        """What a cache entry holds, for a DataStream image batch: latent, context, pooled, size, crop."""
        context, pooled = self.encode_text(batch["caption"])
        return {
            "latent": self.encode_images(batch["pixels"]),
            "context": context,
            "pooled": pooled,
            "size": torch.tensor(batch["size"], dtype=torch.int64),
            "crop": torch.tensor(batch["crop"], dtype=torch.int64),
        }

    def text_cond(self, context, pooled, size, crop, target: tuple[int, int]) -> dict:
        """{context, y for SDXL}: y = pooled text + embeddings of original size, crop and target size (h, w)."""
        cond = {"context": context.float()}
        if self.architecture == "sdxl":
            rows = [
                self.base.encode_adm(
                    pooled_output=p[None],
                    height=int(s[0]),
                    width=int(s[1]),
                    crop_h=int(c[0]),
                    crop_w=int(c[1]),
                    target_height=target[0],
                    target_width=target[1],
                )  # fmt: skip
                for p, s, c in zip(pooled.float(), size, crop, strict=True)
            ]
            cond["y"] = torch.cat(rows).float()
        elif self.architecture in ("sd3", "flux"):  # rectified-flow transformers take the pooled text as y
            cond["y"] = pooled.float()
        return cond

    def conditioning(self, entries: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """(scaled latents, {context, y for SDXL}) of a batch of entries, live or read back from the cache."""
        latents = self.base.latent_format.process_in(entries["latent"].float())
        target = (latents.shape[-2] * 8, latents.shape[-1] * 8)
        return latents, self.text_cond(entries["context"], entries["pooled"], entries["size"], entries["crop"], target)


def cache_key(encoder_settings: dict, data_cfg: StreamConfig, units: list[Unit]) -> tuple[str, dict]:
    """(key, the fields it hashes) of a cache of `units` decoded by data_cfg and encoded with encoder_settings."""
    fields = {
        **encoder_settings,
        "data_fingerprint": fingerprint(units),
        "resolution": data_cfg.resolution,
        "buckets": data_cfg.buckets,
        "caption_key": data_cfg.caption_key,
        "max_pixels": data_cfg.max_pixels,
        "max_upscale": data_cfg.max_upscale,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20], fields


def _entry_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: (v.to(STORED_DTYPE) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()})


def cache_units(folder: Path) -> list[Unit]:
    """The shards of a complete cache folder (from its manifest.json)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return [Unit(str(folder / name), is_shard=True) for name in manifest["shards"]]


def build_cache(
    encoder: ComfyEncoder, data_cfg: StreamConfig, root: Path, batch_size: int = 8, shard_size: int = 1000
) -> Path:
    """DIR/<key>/ for data_cfg's data, built now (this process's part, rank/world from data_cfg) unless complete.
    Every process must call it (they meet in torch.distributed barriers when it is initialised)."""
    from tqdm import tqdm
    from webdataset import TarWriter

    units = scan_units(data_cfg.data)
    key, fields = cache_key(encoder.settings(), data_cfg, units)
    folder = root / key
    if (folder / "manifest.json").is_file():
        log.info("latent cache %s is complete: reading it", folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rank = data_cfg.rank
    for old in folder.glob(f"r{rank:03d}-*.tar"):  # an interrupted build of this key: this process's part again
        old.unlink()
    cfg = replace(data_cfg, batch_size=batch_size, shuffle=False, epochs=1, latents=False)
    stream = DataStream(cfg, units)
    writers: list = [None] * MIN_SHARDS  # sample j goes to writer j % MIN_SHARDS, a new file every shard_size
    counts = [0] * MIN_SHARDS
    shards: list[str] = []
    bar = tqdm(desc=f"caching latents (process {rank})", unit="img", disable=rank != 0)
    try:
        for batch in stream:
            entries = encoder.entries(batch)
            for i, sample_key in enumerate(batch["key"]):
                w = sum(counts) % MIN_SHARDS
                if counts[w] % shard_size == 0:
                    if writers[w] is not None:
                        writers[w].close()
                    shards.append(f"r{rank:03d}-{len(shards):05d}.tar")
                    writers[w] = TarWriter(str(folder / shards[-1]))
                row = {k: v[i] for k, v in entries.items()}
                name = hashlib.sha1(sample_key.encode()).hexdigest()  # tar member names: short, no dots
                writers[w].write({"__key__": name, "safetensors": _entry_bytes(row), "txt": batch["caption"][i]})
                counts[w] += 1
            bar.update(len(batch["key"]))
    finally:
        for writer in writers:
            if writer is not None:
                writer.close()
        bar.close()
    count = sum(counts)
    all_shards, all_counts, all_skips = gather(shards), gather(count), gather(stream.report.entries)
    if rank == 0:
        report = SkipReport([e for part in all_skips for e in part])
        report.write(folder / "skipped.json")
        manifest = {
            "key": key,
            "fields": fields,
            "samples": sum(all_counts),
            "shards": sorted(s for part in all_shards for s in part),
        }
        tmp = folder / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, folder / "manifest.json")
        n, skipped = sum(all_counts), report.counts()
        log.info("latent cache %s: %d samples, skipped %s", folder, n, skipped)
    gather(None)  # a barrier: no process reads the cache before the manifest exists
    return folder


class EncodedStream:
    """(scaled latents, conditioning, null conditioning) batches for the comfy backend: DataStream images encoded
    live, or, with cache_root, read from the latent cache (built first if it is not complete). Resume state and
    skip report are the underlying DataStream's."""

    def __init__(self, encoder: ComfyEncoder, cfg: StreamConfig, cache_root: Path | None = None):
        self.encoder, self.cached = encoder, cache_root is not None
        if self.cached:
            folder = build_cache(encoder, cfg, cache_root)
            units = cache_units(folder)
            self.samples = json.loads((folder / "manifest.json").read_text())["samples"]
            self.stream = DataStream(fit_workers(replace(cfg, data=str(folder), latents=True), self.samples), units)
            skipped = json.loads((folder / "skipped.json").read_text())["samples"]  # skipped while building
            self.stream.report.add([[e["key"], e["kind"], e["detail"]] for e in skipped])
        else:
            units = scan_units(cfg.data)
            self.samples = estimate_samples(units)  # exact for a folder or manifest
            self.stream = DataStream(fit_workers(cfg, self.samples), units)
        self.null_context, self.null_pooled = encoder.encode_text([""])

    def __iter__(self):
        for batch in self.stream:
            entries = batch if self.cached else self.encoder.entries(batch)
            latents, cond = self.encoder.conditioning(entries)
            yield latents, cond, self.null_cond(len(latents), entries["size"], entries["crop"], latents.shape[-2:])

    def null_cond(self, n: int, size, crop, latent_hw) -> dict:
        """The empty caption's conditioning for n samples (SDXL: with their size conditioning)."""
        target = (latent_hw[0] * 8, latent_hw[1] * 8)
        return self.encoder.text_cond(
            self.null_context.expand(n, -1, -1), self.null_pooled.expand(n, -1), size, crop, target
        )


def init_distributed() -> tuple[int, int]:
    """(rank, world) from the launcher's environment (accelerate launch / torchrun), process group initialised."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def main(argv: list[str] | None = None) -> Path:
    from training.backends.comfy import import_comfy
    from training.cli import ArgumentParser
    from training.dataset import add_data_arguments, stream_config

    p = ArgumentParser(prog="python -m training.cache_latents", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="SD1.5 / SD2.1 / SDXL checkpoint (.safetensors)")
    p.add_argument("--data", required=True, help="image folder, .jsonl manifest or tar shards ('s/{00000..00099}.tar')")
    p.add_argument("--resolution", type=int, default=512, help="training size (square; the bucket area with --buckets)")
    p.add_argument("--cache-latents", type=Path, required=True, metavar="DIR", help="cache root (DIR/<key>/)")
    p.add_argument("--batch-size", type=int, default=8, help="images per VAE call, per process")
    p.add_argument("--cache-shard-size", type=int, default=1000, help="samples per cache shard at most")
    p.add_argument("--comfyui", type=Path, default=None, help="ComfyUI checkout (default: $COMFYUI_PATH)")
    add_data_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rank, world = init_distributed()
    cfg = stream_config(args, batch_size=args.batch_size, rank=rank, world=world)
    import_comfy(args.comfyui, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = ComfyEncoder.load(args.checkpoint)
    folder = build_cache(encoder, cfg, args.cache_latents, args.batch_size, args.cache_shard_size)
    if rank == 0:
        print(folder)
    return folder


if __name__ == "__main__":
    from training.cli import run

    run(main)
