"""Sample grids of a run: teacher DDIM-many, teacher DDIM-4 and the student's PeRFlow-4 from the same noises, one
row each, written as a PNG, with the latent MSEs of the two 4-step rows to the first (the run's quality signal).
A flow-matching teacher samples with its own Euler steps instead of DDIM."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.func import functional_call

from perflow_core.flow_windows import flow_sigmas
from training.backends.base import Backend
from training.reflow import ReflowConfig
from training.solvers import flow_ode_solve, guided_eps, ode_solve, perflow_solve, shifted_sigmas


def save_grid(path: str | Path, images: torch.Tensor, nrow: int, pad: int = 2, scale: int = 1) -> None:
    """Write images [N, C, H, W] in [-1, 1] (C = 1 or 3) as a PNG grid, nrow images per row, nearest upscaling."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"save_grid needs 1 or 3 channels, got {c}")
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = pixels[k]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


@torch.no_grad()
def sample_grid(
    backend: Backend,
    weights: dict[str, torch.Tensor],
    rcfg: ReflowConfig,
    path: Path,
    *,
    sample_cfg: float,
    teacher_steps: int,
) -> dict[str, float]:
    """Rows from one seeded noise per preview item: teacher DDIM-`teacher_steps`, teacher DDIM-4, student PeRFlow-4
    with `weights` (EMA or live) swapped into the student module. cfg-mode fixed: the teacher at cfg_scale and the
    student at 1 (guidance is trained in); sync: both at sample_cfg. A flow teacher: Euler on its shifted schedule
    for the teacher rows, Euler on flow_sigmas for PeRFlow-4."""
    cond, null = backend.preview_conds()
    n = len(null["context"]) if isinstance(null, dict) else len(null)
    noise = torch.randn((n, *backend.latent_shape()), generator=torch.Generator().manual_seed(1234))
    noise = noise.to(backend.device)
    fixed = rcfg.cfg_mode == "fixed"
    t_cfg, s_cfg = (rcfg.cfg_scale, 1.0) if fixed else (sample_cfg, sample_cfg)
    ac = backend.alphas_cumprod

    def teacher(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided_eps(backend.teacher_eps, x, torch.full((n,), t, device=x.device), cond, null, t_cfg)

    flow = rcfg.time_kind == "flow"
    if flow:

        def teacher_v(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return guided_eps(backend.teacher_eps, x, s, cond, null, t_cfg)

        ref = flow_ode_solve(teacher_v, noise, shifted_sigmas(teacher_steps, rcfg.flow_shift))
        ddim4 = flow_ode_solve(teacher_v, noise, shifted_sigmas(4, rcfg.flow_shift))
    else:
        ref = ode_solve(teacher, noise, teacher_steps, alphas_cumprod=ac)
        ddim4 = ode_solve(teacher, noise, 4, alphas_cumprod=ac)
    module = backend.student
    student = backend.student_fn(lambda *a, **k: functional_call(module, weights, a, k, strict=False))
    was_training = module.training
    module.eval()
    try:
        if flow:
            sigmas = flow_sigmas(4, rcfg.num_windows, rcfg.flow_shift)
            perflow4 = flow_ode_solve(lambda x, s: guided_eps(student, x, s, cond, null, s_cfg), noise, sigmas)
        else:
            perflow4 = perflow_solve(student, noise, cond, null, s_cfg, rcfg.parameterization, rcfg.num_windows, ac)
    finally:
        module.train(was_training)
    images = backend.decode(torch.cat([ref, ddim4, perflow4]))
    save_grid(path, images, nrow=n, scale=max(1, 64 // images.shape[-1]))
    return {
        "mse_perflow4_vs_teacher": ((perflow4 - ref) ** 2).mean().item(),
        f"mse_{'euler' if flow else 'ddim'}4_vs_teacher": ((ddim4 - ref) ** 2).mean().item(),
    }
