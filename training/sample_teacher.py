"""Sample grid of a toy teacher: DDIM (Euler for a flow teacher), one row per class, left half at one guidance scale,
right half at another.

Usage: python -m training.sample_teacher --out samples.png [--model TEACHER] [--steps 50] [--size 16] [--threads N]
"""

from pathlib import Path

import torch

from training.cli import ArgumentParser, run
from training.preview import save_grid
from training.solvers import flow_ode_solve, guided_eps, ode_solve, shifted_sigmas
from training.toy_model import load_toy_model, toy_time_kind

TEACHER = Path(__file__).resolve().parent / "teacher" / "toy_teacher.safetensors"


def main(argv: list[str] | None = None) -> None:
    """Sample per class at two guidance scales from the same noise and write the PNG grid."""
    p = ArgumentParser(prog="python -m training.sample_teacher", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=TEACHER, help="toy teacher .safetensors (default: the bundled one)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write (refused if it exists)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--size", type=int, default=16, help="image height and width (a multiple of 4)")
    p.add_argument("--cfg", type=float, nargs=2, default=(1.0, 2.5))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (1 <= args.steps <= 1000 and 1 <= args.per_class <= 1000 and 0 <= args.threads <= 1024):
        p.error("--steps and --per-class must be in 1..1000, --threads in 0..1024")
    if not (4 <= args.size <= 1024 and args.size % 4 == 0):
        p.error(f"--size must be a multiple of 4 in 4..1024; got {args.size}")
    if not all(1 <= c <= 30 for c in args.cfg):
        p.error(f"--cfg values must be in [1, 30]; got {args.cfg}")
    if args.out.exists():
        p.error(f"--out {args.out} exists already; pick a new file")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, flow = load_toy_model(args.model), toy_time_kind(args.model) == "flow"
    k, classes = args.per_class, model.num_classes
    labels = torch.arange(classes).repeat_interleave(k)
    null = torch.full_like(labels, classes)
    shape = (len(labels), model.config["in_channels"], args.size, args.size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))

    def sample(cfg: float) -> torch.Tensor:
        def eps(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
            tt = t if isinstance(t, torch.Tensor) else torch.full((len(x),), t)
            return guided_eps(lambda xx, s, c: model(xx, s * 1000, c), x, tt, labels, null, cfg)

        if flow:  # velocity at sigma: the teacher's own Euler steps, unshifted
            return flow_ode_solve(eps, noise, shifted_sigmas(args.steps, 1.0)).view(classes, k, *shape[1:])
        return ode_solve(eps, noise, args.steps).view(classes, k, *shape[1:])

    halves = [sample(c) for c in args.cfg]
    gap = torch.zeros(classes, 1, *shape[1:])  # mid-grey column between the two guidance scales
    save_grid(args.out, torch.cat([halves[0], gap, halves[1]], dim=1).flatten(0, 1), nrow=2 * k + 1, scale=4)
    print(f"wrote {args.out}: rows = classes 0..{classes - 1}, left cfg {args.cfg[0]}, right cfg {args.cfg[1]}")


if __name__ == "__main__":
    run(main)
