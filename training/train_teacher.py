"""Train the toy teacher: class-conditional eps prediction on the SD noise schedule (DDPM objective), EMA weights saved.

Usage: python training/train_teacher.py [--steps 2500] [--minutes 10] [--out training/teacher/toy_teacher.safetensors]
With --minutes the run also ends at that wall-clock budget; the learning-rate schedule follows whichever of steps or
time is further along, so a run slowed by a busy CPU still anneals fully before it stops.
"""

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import trange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toy_data import DEFAULT_DATA, load_toy_data  # noqa: E402
from toy_model import ToyUNet, load_toy_model, save_toy_model, toy_model_metadata  # noqa: E402

from perflow_core.schedule import sd_alphas_cumprod  # noqa: E402

OUT = Path(__file__).resolve().parent / "teacher" / "toy_teacher.safetensors"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (optional)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout to the null class (for CFG)")
    p.add_argument("--base", type=int, default=32)
    p.add_argument("--init", type=Path, default=None, help="continue from a saved toy model (its config wins)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% of the peak as progress goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def main() -> None:
    """Train and save the EMA teacher."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = load_toy_data(args.data)
    num_classes = int(labels.max()) + 1
    ac = sd_alphas_cumprod()
    if args.init is None:
        model = ToyUNet(num_classes=num_classes, in_channels=images.shape[1], base=args.base)
    else:
        model = load_toy_model(args.init).train()
    model = model.to(memory_format=torch.channels_last)  # ~5x faster convolution backward on CPU
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    print(f"{sum(p.numel() for p in model.parameters())} parameters, {len(images)} images, {num_classes} classes")

    start, smooth, steps = time.time(), None, 0
    bar = trange(args.steps, desc="teacher")
    for step in bar:
        progress = step / args.steps
        if args.minutes is not None:
            progress = max(progress, (time.time() - start) / (60 * args.minutes))
            if progress >= 1.0:
                break
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.warmup, progress)
        idx = torch.randint(0, len(images), (args.batch,))
        x0, y = images[idx].contiguous(memory_format=torch.channels_last), labels[idx].clone()
        y[torch.rand(args.batch) < args.p_uncond] = num_classes
        i = torch.randint(0, len(ac), (args.batch,))
        a = ac[i].view(-1, 1, 1, 1)
        eps = torch.randn_like(x0)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps  # DDPM forward: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
        loss = F.mse_loss(model(xt, (i + 1).float(), y), eps)  # fed timestep i+1 = t*1000, noise level ac[t*1000-1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}")
        steps += 1

    bar.close()
    seconds = time.time() - start
    print(f"trained {steps} steps in {seconds / 60:.1f} min, final smoothed loss {smooth:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"objective": "eps", "schedule": "sd_alphas_cumprod", "timestep": "t*1000, t=(i+1)/1000"}
    meta |= {"steps": steps, "batch": args.batch, "lr": args.lr, "ema": args.ema, "p_uncond": args.p_uncond}
    meta |= {"seed": args.seed, "final_loss": round(smooth, 5), "train_seconds": round(seconds), "data": args.data.name}
    meta |= (
        {} if args.init is None else {"init": f"{args.init.name} ({toy_model_metadata(args.init).get('steps')} steps)"}
    )
    save_toy_model(args.out, ema.to(memory_format=torch.contiguous_format), meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
