"""Peak RSS of loading a delta with the strict reader, against the file size."""

import argparse
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def generate(path: str, mb: int) -> None:
    """A synthetic fp16 delta of about `mb` MB: 4 MiB tensors, like SD1.5's larger layers."""
    import torch

    from perflow_core.delta_format import save_delta

    n = mb * 2**20 // (2048 * 1024 * 2)
    tensors = {f"diffusion_model.block.{i}.weight": torch.randn(2048, 1024).half() * 1e-3 for i in range(n)}
    save_delta(path, tensors, parameterization="diff_eps", num_windows=4, base_architecture="sd15", base_hash="0" * 64)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load(path: str) -> None:
    """Run in a fresh process: print RSS after imports and the peak after loading every tensor."""
    from perflow_core.delta_keys import read_weight_file

    before = peak_rss_mb()
    wf = read_weight_file(path)
    held = sum(t.numel() * t.element_size() for t in wf.tensors.values()) / 2**20
    after = peak_rss_mb()
    size = os.path.getsize(path) / 2**20
    print(f"file {size:.1f} MiB, tensors held {held:.1f} MiB, format {wf.format}")
    print(f"peak RSS after imports {before:.1f} MiB, after load {after:.1f} MiB")
    print(f"load overhead (peak - imports) {after - before:.1f} MiB = {(after - before) / size:.2f} x file size")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--path", default="/tmp/perflow_bench_delta.safetensors")
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_only:
        load(args.path)
    else:
        generate(args.path, args.mb)
        subprocess.run([sys.executable, __file__, "--load-only", "--path", args.path], check=True)
        os.remove(args.path)
