"""Data throughput on this machine (printed, not asserted): samples/s from tar shards to decoded batches and to
VAE latents + text embeddings with 0 and 2 DataLoader workers, and comfy-backend training steps/s from the latent
cache against live encoding.

    COMFYUI_PATH=/work/comfyui python -m benchmarks.data_throughput --checkpoint tiny-sd15.safetensors

Generated data: --images random JPEGs of 300x400 / 400x300 px with captions, in shards of 16. The checkpoint's
VAE and text encoder do the encoding (the random-init test checkpoints of tests/checkpoints.py have full-size ones).
"""

import io
import json
import os
import tarfile
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch


def write_shards(folder: Path, n: int) -> str:
    """n random JPEG samples with .txt captions in tar shards of 16; returns their brace pattern."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    shards = (n + 15) // 16
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * 16, min(n, (s + 1) * 16)):
                h, w = (300, 400) if i % 2 else (400, 300)
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
                for name, data in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", f"caption {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def rate(batches, n_batches: int) -> float:
    """samples/s over n_batches of an iterator (its first batch excluded: worker start-up)."""
    it = iter(batches)
    next(it)
    t0, n = time.perf_counter(), 0
    for b in islice(it, n_batches):
        n += len(b["key"]) if isinstance(b, dict) else len(b[0])
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    from training.backends.comfy import import_comfy
    from training.cache_latents import ComfyEncoder, EncodedStream
    from training.cli import ArgumentParser
    from training.dataset import DataStream, StreamConfig
    from training.train import train

    p = ArgumentParser(prog="python -m benchmarks.data_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="SD1.5 / SDXL checkpoint")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="perflow-data-bench-"))
    pattern = write_shards(tmp / "shards", args.images)
    batches = args.images // args.batch_size - 2  # what an epoch of 0 workers gives, less the first
    results = {}
    for workers in (0, 2):
        cfg = StreamConfig(data=pattern, batch_size=args.batch_size, resolution=args.resolution, workers=workers)
        results[f"decode, {workers} workers"] = rate(DataStream(cfg), batches)
    import_comfy(None, torch.device("cpu"))
    enc = ComfyEncoder.load(args.checkpoint)
    for workers in (0, 2):
        cfg = StreamConfig(data=pattern, batch_size=args.batch_size, resolution=args.resolution, workers=workers)
        results[f"shards -> latents, {workers} workers"] = rate(EncodedStream(enc, cfg), min(batches, 8))
    argv = [
        "--backend", "comfy", "--checkpoint", str(args.checkpoint), "--data", pattern, "--resolution",
        str(args.resolution), "--batch-size", str(args.batch_size), "--solver-steps", "1", "--no-samples",
        "--ema-decay", "0", "--threads", "1", "--steps", str(args.train_steps), "--data-workers", "2",
    ]  # fmt: skip
    cache = ["--cache-latents", str(tmp / "cache")]
    train([*argv, "--out", str(tmp / "warm"), *cache, "--steps", "1"])  # builds the cache (not timed)
    for name, extra in (("live encoding", []), ("cached latents", cache)):
        summary = train([*argv, "--out", str(tmp / name.replace(" ", "_")), *extra])
        results[f"training steps/s, {name}"] = 1 / summary["seconds_per_it"]
    print(f"checkpoint {args.checkpoint.name}, {args.images} images at {args.resolution} px, batch {args.batch_size}")
    print(f"cpu threads {torch.get_num_threads()}, cores {os.cpu_count()}")
    for k, v in results.items():
        print(f"{k:40s} {v:8.2f}")
    ratios = {
        "2 workers / 0 workers, decode": results["decode, 2 workers"] / results["decode, 0 workers"],
        "2 workers / 0 workers, to latents": results["shards -> latents, 2 workers"]
        / results["shards -> latents, 0 workers"],
        "cached / live, training steps/s": results["training steps/s, cached latents"]
        / results["training steps/s, live encoding"],
    }
    for k, v in ratios.items():
        print(f"{k:40s} {v:8.2f}x")
    print(json.dumps({"results": results, "ratios": ratios}))


if __name__ == "__main__":
    from training.cli import run

    run(main)
