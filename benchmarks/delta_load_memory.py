"""Peak RSS of reading a delta with the strict reader (perflow_core.read_weight_file), against the file size.

Two layouts: 'many' (4 MiB fp16 tensors, like SD1.5's larger layers) and 'single' (one tensor holding the whole
file, the worst case for a reader that copies or checks a tensor at once). The target: peak - imports stays near
the file size (the tensors the caller keeps) plus at most one tensor. Each load runs in a fresh process. Also run
by the toy benchmark's cost phase (benchmarks.toy) on its trained delta.
Usage: python -m benchmarks.delta_load_memory [--mb 512] [--layout many single]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ME = [sys.executable, "-m", "benchmarks.delta_load_memory"]


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
    """Run in a fresh process: print one JSON line with the RSS after imports and the peak after reading."""
    from perflow_core import read_weight_file

    before = peak_rss_mib()
    wf = read_weight_file(path)
    after = peak_rss_mib()
    largest = max(t.numel() * t.element_size() for t in wf.tensors.values()) / 2**20
    rec = {"file_mib": os.path.getsize(path) / 2**20, "tensors": len(wf.tensors), "largest_tensor_mib": largest}
    rec |= {"format": wf.format, "rss_after_imports_mib": before, "peak_rss_mib": after, "read_mib": after - before}
    print(json.dumps(rec))


def measure_load(path: str | Path) -> dict:
    """Read `path` in a fresh process (load above); returns its JSON record."""
    res = subprocess.run([*ME, "--load-only", str(path)], capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"delta load probe failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


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
    for layout in args.layout:  # this process never imports torch; each step runs in a fresh one
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "delta.safetensors")
            subprocess.run(
                [*ME, "--mb", str(args.mb), "--layout", layout, "--generate-only", path], check=True, cwd=REPO
            )
            r = measure_load(path)
            print(f"layout {layout}:")
            print(
                f"  file {r['file_mib']:.1f} MiB in {r['tensors']} tensors (largest {r['largest_tensor_mib']:.1f} MiB)"
            )
            print(
                f"  peak RSS after imports {r['rss_after_imports_mib']:.1f} MiB, "
                f"after reading {r['peak_rss_mib']:.1f} MiB"
            )
            print(
                f"  read overhead (peak - imports) {r['read_mib']:.1f} MiB = "
                f"{r['read_mib'] / r['file_mib']:.2f} x file size; "
                f"bound file + largest tensor = {r['file_mib'] + r['largest_tensor_mib']:.1f} MiB"
            )


if __name__ == "__main__":
    main()
