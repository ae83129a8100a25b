"""Train a toy teacher: class-conditional eps prediction on the SD noise schedule (DDPM objective) or, with
--objective flow, velocity prediction on the rectified-flow line (SD3 / Flux style); EMA weights saved.

Usage: python -m training.train_teacher --out teacher.safetensors [--objective flow] [--steps 2500] [--minutes 10]
With --minutes the run also ends at that wall-clock budget; the learning-rate schedule follows whichever of steps or
time is further along, so a run slowed by a busy CPU still anneals fully before it stops.
"""

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import trange

from perflow_core.schedule import sd_alphas_cumprod
from training.cli import ArgumentParser, UserError, run
from training.ema import EMA
from training.toy_data import DEFAULT_DATA, load_toy_data
from training.toy_model import ToyUNet, load_toy_model, save_toy_model, toy_model_metadata


def parse_args(argv: list[str] | None = None):
    """Command-line options."""
    p = ArgumentParser(prog="python -m training.train_teacher", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="eps",
        help="eps: DDPM on the SD noise table; flow: velocity eps - x0 on x_s = (1 - s) x0 + s eps, s uniform",
    )
    p.add_argument("--out", type=Path, required=True, help="the teacher file to write (refused if it exists)")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (optional)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout to the null class (for CFG)")
    p.add_argument("--base", type=int, default=32)
    p.add_argument("--init", type=Path, default=None, help="continue from a saved toy model (its config wins)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    checks = [
        ("steps", 1 <= args.steps <= 10**8),
        ("batch", 1 <= args.batch <= 65536),
        ("lr", 0 < args.lr <= 1),
        ("warmup", args.warmup >= 0),
        ("ema", 0 <= args.ema < 1),
        ("p-uncond", 0 <= args.p_uncond < 1),
        ("base", 8 <= args.base <= 1024 and args.base % 8 == 0),
        ("threads", 0 <= args.threads <= 1024),
        ("minutes", args.minutes is None or args.minutes > 0),
    ]
    for name, ok in checks:
        if not ok:
            p.error(f"--{name} is out of range: {getattr(args, name.replace('-', '_'))!r}")
    if args.out.exists():
        p.error(f"--out {args.out} exists already; pick a new file (nothing shipped is ever overwritten)")
    return args


def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% of the peak as progress goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def ddpm_loss(
    model: ToyUNet, x0: torch.Tensor, labels: torch.Tensor, p_uncond: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DDPM eps objective (Ho et al. 2020) at a uniform timestep index i, the network fed i + 1 = t*1000 (noise level
    alphas_cumprod[t*1000 - 1]); labels dropped to the null class with probability p_uncond (for CFG)."""
    n, dev = len(x0), x0.device
    labels = torch.where(torch.rand(n, generator=generator).to(dev) < p_uncond, model.num_classes, labels)
    i = torch.randint(0, 1000, (n,), generator=generator).to(dev)
    a = sd_alphas_cumprod().to(dev)[i].view(-1, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=generator).to(dev)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps  # DDPM forward: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    return F.mse_loss(model(xt, (i + 1).float(), labels), eps)


def flow_loss(
    model: ToyUNet, x0: torch.Tensor, labels: torch.Tensor, p_uncond: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rectified-flow objective (SD3, arXiv 2403.03206 Sec. 2): x_s = (1 - s) x0 + s eps, target v = eps - x0, the
    network fed s*1000 as ComfyUI feeds a flow model. s is uniform in (0, 1], not SD3's logit-normal: every sampler
    starts at s = 1 and every PeRFlow window starts at a fixed s, where the logit-normal density vanishes at the
    ends; on the toy the teacher must be accurate along the whole line, not where high-resolution detail forms."""
    n, dev = len(x0), x0.device
    labels = torch.where(torch.rand(n, generator=generator).to(dev) < p_uncond, model.num_classes, labels)
    s = (1.0 - torch.rand(n, generator=generator)).to(dev)
    eps = torch.randn(x0.shape, generator=generator).to(dev)
    sb = s.view(-1, 1, 1, 1)
    xs = (1 - sb) * x0 + sb * eps
    return F.mse_loss(model(xs, s * 1000, labels), eps - x0)


OBJECTIVES = {"eps": ddpm_loss, "flow": flow_loss}


def main(argv: list[str] | None = None) -> None:
    """Train and save the EMA teacher."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = load_toy_data(args.data)
    if len(images) == 0:
        raise UserError(f"{args.data}: no images; give an .npz with at least one image")
    num_classes = int(labels.max()) + 1
    if args.init is None:
        model = ToyUNet(num_classes=num_classes, in_channels=images.shape[1], base=args.base)
    else:
        model = load_toy_model(args.init).train()
    model = model.to(memory_format=torch.channels_last)  # ~5x faster convolution backward on CPU
    params = dict(model.named_parameters())
    ema = EMA(params, args.ema)
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
        x0 = images[idx].contiguous(memory_format=torch.channels_last)
        loss = OBJECTIVES[args.objective](model, x0, labels[idx], args.p_uncond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(params)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}")
        steps += 1

    bar.close()
    seconds = time.time() - start
    print(f"trained {steps} steps in {seconds / 60:.1f} min, final smoothed loss {smooth:.4f}")
    model.load_state_dict(ema.shadow)
    if args.objective == "flow":
        meta = {"objective": "velocity", "time_kind": "flow", "timestep": "sigma*1000", "time_sampling": "uniform"}
    else:
        meta = {"objective": "eps", "schedule": "sd_alphas_cumprod", "timestep": "t*1000, t=(i+1)/1000"}
    meta |= {"steps": steps, "batch": args.batch, "lr": args.lr, "ema": args.ema, "p_uncond": args.p_uncond}
    meta |= {"seed": args.seed, "final_loss": round(smooth, 5), "train_seconds": round(seconds), "data": args.data.name}
    meta |= (
        {} if args.init is None else {"init": f"{args.init.name} ({toy_model_metadata(args.init).get('steps')} steps)"}
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_toy_model(args.out, model.to(memory_format=torch.contiguous_format), meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run(main)
