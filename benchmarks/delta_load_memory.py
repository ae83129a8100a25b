"""Peak RSS of reading a delta with the strict reader (perflow_core.read_weight_file), against the file size.

Two layouts: 'many' (4 MiB fp16 tensors, like SD1.5's larger layers) and 'single' (one tensor holding the whole
file, the worst case for a reader that copies or checks a tensor at once). The target: peak - imports stays near
the file size (the tensors the caller keeps) plus at most one tensor. Each load runs in a fresh process.
Usage: python -m benchmarks.delta_load_memory [--mb 512] [--layout many single]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def generate(path: str, mb: int, layout: str) -> None:
    """A synthetic fp16 delta of about `mb` MiB."""
    import torch

    from perflow_core.delta_format import save_delta

    if layout == "single":
        tensors = {"diffusion_model.block.0.weight": torch.full((mb * 2**20 // 2,), 1e-3, dtype=torch.float16)}
    else:
        n = max(1, mb * 2**20 // (2048 * 1024 * 2))
        tensors = {f"diffusion_model.block.{i}.weight": torch.full((2048, 1024), 1e-3).half() for i in range(n)}
    save_delta(path, tensors, parameterization="diff_eps", num_windows=4, base_architecture="sd15", base_hash="0" * 64)


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (Linux; ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def load(path: str) -> None:
    """Run in a fresh process: print RSS after imports and the peak after reading every tensor."""
    from perflow_core import read_weight_file

    before = peak_rss_mib()
    wf = read_weight_file(path)
    after = peak_rss_mib()
    size = os.path.getsize(path) / 2**20
    largest = max(t.numel() * t.element_size() for t in wf.tensors.values()) / 2**20
    print(f"  file {size:.1f} MiB in {len(wf.tensors)} tensors (largest {largest:.1f} MiB), format {wf.format}")
    print(f"  peak RSS after imports {before:.1f} MiB, after reading {after:.1f} MiB")
    print(
        f"  read overhead (peak - imports) {after - before:.1f} MiB = {(after - before) / size:.2f} x file size; "
        f"bound file + largest tensor = {size + largest:.1f} MiB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--layout", nargs="+", choices=["many", "single"], default=["many", "single"])
    ap.add_argument("--load-only", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--generate-only", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_only:
        load(args.load_only)
        return
    if args.generate_only:
        generate(args.generate_only, args.mb, args.layout[0])
        return
    me = [sys.executable, "-m", "benchmarks.delta_load_memory", "--mb", str(args.mb)]
    for layout in args.layout:  # this process never imports torch; each step runs in a fresh one
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "delta.safetensors")
            subprocess.run([*me, "--layout", layout, "--generate-only", path], check=True, cwd=REPO)
            print(f"layout {layout}:", flush=True)
            subprocess.run([*me, "--load-only", path], check=True, cwd=REPO)


if __name__ == "__main__":
    main()
