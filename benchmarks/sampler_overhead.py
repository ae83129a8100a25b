"""Per-step overhead of the PeRFlow path (model sampling + sample_perflow) over a bare Euler loop.

Both loops call the same cheap network on a latent (default 1x4x64x64); the difference per step is what PeRFlow
adds around a real UNet call. Also run by the toy benchmark's cost phase (benchmarks.toy).
Usage: python -m benchmarks.sampler_overhead [--steps 1000] [--repeats 5]
"""

import argparse
import time

import torch

from perflow_core.model_sampling import PeRFlowModelSampling
from perflow_core.sampling import sample_perflow

PARAMETERIZATIONS = ("diff_eps", "ddim_eps", "velocity")


def cheap_network(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    return x * 0.5


def bare_euler(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * cheap_network(x, sigmas[i])
    return x


def perflow_path(ms: PeRFlowModelSampling, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    def model(x, s):
        return ms.calculate_denoised(s, cheap_network(ms.calculate_input(s, x), ms.timestep(s)), x)

    return sample_perflow(model, ms.noise_scaling(sigmas[0], x, torch.zeros_like(x), True), sigmas, disable=True)


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(steps: int, repeats: int, shape: tuple[int, ...] = (1, 4, 64, 64)) -> dict[str, dict[str, float]]:
    """Per parameterization: microseconds per step of the bare Euler loop, of the PeRFlow path, and their difference."""
    x = torch.randn(shape)
    sigmas = torch.linspace(1, 0, steps + 1)
    out = {}
    for param in PARAMETERIZATIONS:
        ms = PeRFlowModelSampling(param, 4)
        bare = best_seconds(lambda: bare_euler(x, sigmas), repeats) / steps * 1e6
        ours = best_seconds(lambda ms=ms: perflow_path(ms, x, sigmas), repeats) / steps * 1e6
        out[param] = {"bare_us_per_step": bare, "perflow_us_per_step": ours, "overhead_us_per_step": ours - bare}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), latent 1x4x64x64, {args.steps} steps")
    for param, r in measure(args.steps, args.repeats).items():
        print(
            f"{param:9s} bare euler {r['bare_us_per_step']:7.1f} us/step  perflow {r['perflow_us_per_step']:7.1f} "
            f"us/step  overhead {r['overhead_us_per_step']:7.1f} us/step (budget 150)"
        )


if __name__ == "__main__":
    main()
