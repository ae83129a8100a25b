"""Sample grid of the toy teacher: DDIM, one row per class, left half cfg 1, right half cfg 2.5 (same noise).

Usage: python training/sample_teacher.py [--model training/teacher/toy_teacher.safetensors] [--steps 50]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toy_model import load_toy_model  # noqa: E402
from toy_sampling import ddim_sample, save_grid  # noqa: E402

TEACHER = Path(__file__).resolve().parent / "teacher"


def main() -> None:
    """Sample per class at two guidance scales and write the PNG grid."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=TEACHER / "toy_teacher.safetensors")
    p.add_argument("--out", type=Path, default=TEACHER / "teacher_samples.png")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--cfg", type=float, nargs=2, default=(1.0, 2.5))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    model = load_toy_model(args.model)
    k, classes = args.per_class, model.num_classes
    labels = torch.arange(classes).repeat_interleave(k)
    noise = torch.randn(
        len(labels), model.config["in_channels"], 16, 16, generator=torch.Generator().manual_seed(args.seed)
    )
    halves = [ddim_sample(model, noise, labels, args.steps, cfg=c).view(classes, k, *noise.shape[1:]) for c in args.cfg]
    gap = torch.zeros(classes, 1, *noise.shape[1:])  # mid-grey column between the two guidance scales
    save_grid(args.out, torch.cat([halves[0], gap, halves[1]], dim=1).flatten(0, 1), nrow=2 * k + 1, scale=4)
    print(f"wrote {args.out}: rows = classes 0..{classes - 1}, left cfg {args.cfg[0]}, right cfg {args.cfg[1]}")


if __name__ == "__main__":
    main()
