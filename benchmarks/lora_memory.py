"""LoRA against full PeRFlow training, through the trainer's own command line (numbers, not a test).

    python -m benchmarks.lora_memory memory --checkpoint sd15.safetensors   # ComfyUI's Python, COMFYUI_PATH set
    python -m benchmarks.lora_memory toy --steps 600

memory: `python -m training.train --backend comfy` on a 64 px, batch-1 job, once full and once with --lora-rank,
each in its own child process; prints each child's peak RSS (os.wait4) and the ratio (issue 11 target: LoRA at most
0.6x full on the full-size SD1.5). Full training holds teacher, student, gradients, AdamW moments and the EMA, about
24 bytes per UNet parameter (~20 GB for SD1.5's 860 M): run the full leg where that fits (--legs lora skips it).
toy: the toy teacher trained full and as LoRA for the same steps; prints PeRFlow-4's paired error against the
teacher's many-step DDIM (metrics.json of each run: same noises and labels) beside the teacher's own DDIM-4
(target: the LoRA still beats DDIM-4).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """(exit status, peak RSS in MiB, seconds) of one child process, its output going to `log`."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, time.time() - t0  # Linux: ru_maxrss in KiB


def write_images(folder: Path, n: int = 2, size: int = 64) -> Path:
    """A tiny captioned image folder (random pixels): the comfy backend's data for a memory run."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo number {i}")
    return folder


def train_cmd(args: argparse.Namespace, out: Path, lora: bool, extra: list[str]) -> list[str]:
    cmd = [args.python, "-m", "training.train", "--out", str(out), "--steps", str(args.steps), "--seed", "0"]
    if lora:
        cmd += ["--lora-rank", str(args.rank)]
    return cmd + extra + shlex.split(args.extra)


def memory(args: argparse.Namespace, tmp: Path) -> dict:
    data = write_images(tmp / "data")
    common = ["--backend", "comfy", "--checkpoint", str(args.checkpoint), "--data", str(data), "--resolution", "64"]
    common += ["--batch-size", "1", "--no-samples", "--threads", str(args.threads)]
    if args.comfyui:
        common += ["--comfyui", str(args.comfyui)]
    rows = {}
    for leg in args.legs:
        code, mib, secs = run_child(train_cmd(args, tmp / leg, leg == "lora", common), tmp / f"{leg}.log")
        rows[leg] = {"exit": code, "peak_rss_mib": round(mib, 1), "seconds": round(secs, 1)}
        print(f"{leg:5s} exit {code}  peak RSS {mib:9.1f} MiB  {secs:7.1f} s   log {tmp / f'{leg}.log'}")
        if code != 0:
            print((tmp / f"{leg}.log").read_text()[-2000:])
    if {"full", "lora"} <= set(rows) and all(r["exit"] == 0 for r in rows.values()):
        ratio = rows["lora"]["peak_rss_mib"] / rows["full"]["peak_rss_mib"]
        rows["lora_over_full"] = round(ratio, 3)
        print(f"LoRA / full peak RSS = {ratio:.3f} (target <= 0.6)")
    return rows


def toy(args: argparse.Namespace, tmp: Path) -> dict:
    common = ["--backend", "toy", "--batch-size", "32", "--solver-steps", "4", "--timestep-grid", "8"]
    common += ["--threads", str(args.threads)]
    rows = {}
    for leg in args.legs:
        lr = args.lora_lr if leg == "lora" else args.lr
        log = tmp / f"{leg}.log"
        code, mib, secs = run_child(train_cmd(args, tmp / leg, leg == "lora", common + ["--lr", str(lr)]), log)
        metrics = json.loads((tmp / leg / "metrics.json").read_text()) if code == 0 else {}
        rows[leg] = {"exit": code, "seconds": round(secs, 1), "peak_rss_mib": round(mib, 1), **metrics}
        if code != 0:
            print(f"{leg}: exit {code}\n" + log.read_text()[-2000:])
    ok = [leg for leg in args.legs if rows[leg]["exit"] == 0]
    for leg in ok:
        r = rows[leg]
        print(
            f"{leg:5s} {args.steps} steps: PeRFlow-4 paired MSE to the teacher {r['mse_perflow4_vs_teacher']:.5f}  "
            f"teacher DDIM-4 {r['mse_ddim4_vs_teacher']:.5f}  ({r['seconds']:.0f} s, peak {r['peak_rss_mib']:.0f} MiB)"
        )
    if "lora" in ok:
        r = rows["lora"]
        print(f"LoRA beats DDIM-4: {r['mse_perflow4_vs_teacher'] < r['mse_ddim4_vs_teacher']}")
    if {"full", "lora"} <= set(ok):
        ratio = rows["lora"]["mse_perflow4_vs_teacher"] / rows["full"]["mse_perflow4_vs_teacher"]
        print(f"LoRA / full PeRFlow-4 error = {ratio:.2f} at equal steps")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("memory", "toy"))
    p.add_argument("--checkpoint", type=Path, help="memory: the SD1.5 checkpoint (e.g. the random-init full size)")
    p.add_argument("--comfyui", type=Path, default=None, help="memory: ComfyUI folder (else $COMFYUI_PATH)")
    p.add_argument("--legs", nargs="+", choices=("full", "lora"), default=["full", "lora"])
    p.add_argument("--rank", type=int, default=8, help="--lora-rank of the LoRA leg")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per leg (memory: 3, toy: 600)")
    p.add_argument("--lr", type=float, default=3e-4, help="toy: learning rate of the full leg (make demo's)")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="toy: learning rate of the LoRA leg")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--python", default=sys.executable, help="the Python that runs training.train")
    p.add_argument("--extra", default="", help="further training.train options for both legs")
    p.add_argument("--out", type=Path, default=None, help="keep runs, logs and results.json here (else a temp dir)")
    args = p.parse_args()
    if args.mode == "memory" and (args.checkpoint is None or not args.checkpoint.is_file()):
        p.error(f"memory needs --checkpoint: an SD1.5 .safetensors file (got {args.checkpoint})")
    args.steps = args.steps or (3 if args.mode == "memory" else 600)
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as scratch:
        tmp = args.out or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        rows = (memory if args.mode == "memory" else toy)(args, tmp)
        if args.out:
            (tmp / "results.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
