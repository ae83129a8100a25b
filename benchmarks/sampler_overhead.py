"""Per-step overhead of the PeRFlow path (model sampling + sample_perflow) over a bare Euler loop.

Both loops call the same cheap network on a 1x4x64x64 latent; the difference per step is what PeRFlow adds
around a real UNet call. Usage: python -m benchmarks.sampler_overhead [--steps 1000] [--repeats 5]
"""

import argparse
import time

import torch

from perflow_core.model_sampling import PeRFlowModelSampling
from perflow_core.sampling import sample_perflow


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 4, 64, 64)
    sigmas = torch.linspace(1, 0, args.steps + 1)
    print(f"torch {torch.__version__}, {args.threads} thread(s), latent 1x4x64x64, {args.steps} steps")
    for param in ("diff_eps", "ddim_eps", "velocity"):
        ms = PeRFlowModelSampling(param, 4)
        bare = best_seconds(lambda: bare_euler(x, sigmas), args.repeats) / args.steps
        ours = best_seconds(lambda ms=ms: perflow_path(ms, x, sigmas), args.repeats) / args.steps
        print(
            f"{param:9s} bare euler {bare * 1e6:7.1f} us/step  perflow {ours * 1e6:7.1f} us/step  "
            f"overhead {(ours - bare) * 1e6:7.1f} us/step (budget 150)"
        )


if __name__ == "__main__":
    main()
