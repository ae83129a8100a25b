"""PeRFlow delta -> kohya-style LoRA by truncated SVD per layer (loadable by ComfyUI's LoraLoaderModelOnly).

    python -m training.extract_lora runs/toy/perflow_delta.safetensors --rank 4 8 16 --out runs/toy/lora.safetensors

Keys: `lora_unet_<UNet key without "diffusion_model.", dots as underscores>` with `.lora_down.weight`,
`.lora_up.weight` and `.alpha` (= rank, so ComfyUI's alpha/rank scale is 1). Linear weights: down [r, in],
up [out, r]; conv k x k weights (reshaped to [out, in*k*k]): down conv k x k [r, in, k, k], up conv 1x1 [out, r, 1, 1].
1-D weights (norms) are kept whole as `.diff`, biases as `.diff_b`; ComfyUI's LoRA loader applies both.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from perflow_core.atomic_file import atomic_path
from perflow_core.safetensors_file import load_tensors, read_header

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UNET_PREFIX = "diffusion_model."


def lora_name(key: str) -> str:
    """'diffusion_model.input_blocks.1.1.proj_in.weight' -> 'lora_unet_input_blocks_1_1_proj_in' (kohya / ComfyUI)."""
    stem = key.removeprefix(UNET_PREFIX).rsplit(".", 1)[0]
    return "lora_unet_" + stem.replace(".", "_")


def extract_lora(
    delta: dict[str, torch.Tensor], rank: int, dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], float]:
    """(LoRA tensors, relative Frobenius error ||delta - lora|| / ||delta|| over all tensors) for one rank;
    the error of each layer is the norm of its discarded singular values (Eckart-Young)."""
    if rank < 1:
        raise ValueError(f"rank must be a positive integer; got {rank}")
    out, err2, total2 = {}, 0.0, 0.0
    for key in sorted(delta):
        d = delta[key].float()
        total2 += d.pow(2).sum().item()
        name = lora_name(key)
        if key.endswith(".bias"):
            out[f"{name}.diff_b"] = d.to(dtype)
        elif not key.endswith(".weight"):
            raise ValueError(f"{key}: only .weight and .bias tensors can be expressed in a LoRA file")
        elif d.ndim < 2:
            out[f"{name}.diff"] = d.to(dtype)
        else:
            u, s, vh = torch.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
            r = min(rank, s.numel())
            err2 += s[r:].pow(2).sum().item()
            up, down = u[:, :r] * s[:r], vh[:r]
            if d.ndim == 4:
                up, down = up.reshape(d.shape[0], r, 1, 1), down.reshape(r, *d.shape[1:])
            out[f"{name}.lora_up.weight"] = up.contiguous().to(dtype)
            out[f"{name}.lora_down.weight"] = down.contiguous().to(dtype)
            out[f"{name}.alpha"] = torch.tensor(float(r), dtype=dtype)
    return out, (err2 / total2) ** 0.5 if total2 > 0 else 0.0


def save_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: readers never see a partial file."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def main(argv: list[str] | None = None) -> list[dict]:
    """CLI: one LoRA file per rank; prints size and relative reconstruction error per rank."""
    p = argparse.ArgumentParser(prog="python -m training.extract_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("delta", type=Path, help="PeRFlow delta .safetensors")
    p.add_argument("--rank", type=int, nargs="+", default=[32], help="one or more ranks")
    p.add_argument("--out", type=Path, default=None, help="output file (several ranks: _r<rank> is appended)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    args = p.parse_args(argv)
    if any(r < 1 or r > 4096 for r in args.rank):
        p.error(f"--rank values must be integers in 1..4096; got {args.rank}")
    meta = read_header(args.delta).metadata
    delta = load_tensors(args.delta)
    out = args.out or args.delta.with_name(args.delta.stem + "_lora.safetensors")
    rows = []
    for r in args.rank:
        path = out if len(args.rank) == 1 else out.with_name(f"{out.stem}_r{r}{out.suffix}")
        lora, err = extract_lora(delta, r, DTYPES[args.dtype])
        info = {k: v for k, v in meta.items() if not k.startswith("perflow_format")}
        info |= {"ss_network_dim": str(r), "ss_network_alpha": str(r), "perflow_lora_relative_error": f"{err:.6f}"}
        save_lora(path, lora, info)
        size = sum(t.numel() * t.element_size() for t in lora.values())
        rows.append({"rank": r, "file": str(path), "megabytes": round(size / 2**20, 3), "relative_error": err})
        print(f"rank {r:5d}  {size / 2**20:9.3f} MB  relative error {err:.5f}  {path}")
    print(json.dumps({"delta_megabytes": round(sum(t.numel() * 4 for t in delta.values()) / 2**20, 3)}))
    return rows


if __name__ == "__main__":
    main()
