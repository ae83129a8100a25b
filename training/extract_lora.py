"""PeRFlow delta -> kohya-style LoRA by truncated SVD per layer (loadable by ComfyUI's LoraLoaderModelOnly).

    python -m training.extract_lora runs/toy/perflow_delta.safetensors --rank 4 8 16 --out runs/toy/lora.safetensors

Keys and layout as training.lora.kohya_tensors writes them (alpha = the rank kept, so ComfyUI's alpha / rank scale
is 1); the singular values are split evenly between lora_up and lora_down (sqrt(s) each), which keeps the factors
inside the range of fp16 wherever the delta allows it. 1-D weights (norms) are kept whole as `.diff`, biases as
`.diff_b`; ComfyUI's LoRA loader applies both. A rank above what a matrix allows keeps the matrix's full rank,
says so, and the file's metadata records the ranks kept. Existing files are never replaced without --overwrite.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from perflow_core.delta_format import DeltaMetadata
from perflow_core.delta_keys import WeightFile, ldm_key_map, looks_merged, read_weight_file
from training.cli import ArgumentParser, UserError, run
from training.export import write_lora
from training.lora import kohya_name, kohya_tensors, lora_product

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MAX_RANK = 4096


@dataclass
class Extraction:
    """One rank's LoRA tensors, the relative Frobenius error of those (cast) tensors against the delta, and the
    weights whose matrices allow fewer than `rank` singular values ({weight key: rank kept})."""

    rank: int
    tensors: dict[str, torch.Tensor]
    relative_error: float
    clamped: dict[str, int]


def _cast(key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, refused when a value lies beyond the dtype's range (it would become inf)."""
    limit = torch.finfo(dtype).max
    peak = t.abs().max().item() if t.numel() else 0.0
    if peak > limit:
        raise ValueError(
            f"{key}: LoRA values reach {peak:.4g}, beyond the range of {dtype} (largest {limit:.4g}); "
            "use --dtype fp32 or bf16"
        )
    return t.to(dtype)


def extract_loras(delta: dict[str, torch.Tensor], ranks: list[int], dtype: torch.dtype) -> list[Extraction]:
    """One Extraction per rank from one SVD per layer. The error is measured on the factors as written (after the
    cast to `dtype`), so rounding and underflow are counted; values that would overflow `dtype` are refused."""
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {ranks!r}")
    outs = {r: {} for r in ranks}
    err2, clamped, total2 = dict.fromkeys(ranks, 0.0), {r: {} for r in ranks}, 0.0
    for key in tqdm(sorted(delta), desc="SVD", unit="layer", disable=None):
        d = delta[key].float()
        total2 += d.pow(2).sum().item()
        name = kohya_name(key)
        if key.endswith(".bias") or (key.endswith(".weight") and d.ndim < 2):
            part = "diff_b" if key.endswith(".bias") else "diff"
            kept = _cast(key, d, dtype)
            for r in ranks:
                outs[r][f"{name}.{part}"] = kept
                err2[r] += (kept.float() - d).pow(2).sum().item()
            continue
        if not key.endswith(".weight"):
            raise ValueError(f"{key}: only .weight and .bias tensors can be expressed in a LoRA file")
        u, s, vh = torch.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
        for r in ranks:
            kept = min(r, s.numel())
            if kept < r:
                clamped[r][key] = kept
            root = s[:kept].sqrt()
            up, down = _cast(key, u[:, :kept] * root, dtype), _cast(key, root[:, None] * vh[:kept], dtype)
            module = kohya_tensors(key, up, down, kept, d.shape, dtype)
            outs[r] |= module
            approx = lora_product(module[f"{name}.lora_up.weight"], module[f"{name}.lora_down.weight"], kept, d.shape)
            err2[r] += (approx - d).pow(2).sum().item()
    return [Extraction(r, outs[r], (err2[r] / total2) ** 0.5 if total2 > 0 else 0.0, clamped[r]) for r in ranks]


def delta_tensors(path: Path) -> tuple[dict[str, torch.Tensor], DeltaMetadata | None]:
    """The delta's tensors under the UNet key names kohya_name expects, and its PeRFlow metadata (if any).
    Refuses what is not a floating-point weight difference: a LoRA, a full model, integer or empty tensors."""
    wf: WeightFile = read_weight_file(path)
    if wf.format == "kohya_lora":
        raise UserError(f"{path}: this is a LoRA already; extract_lora reads a PeRFlow delta")
    for key, t in wf.tensors.items():
        if not t.is_floating_point():
            raise UserError(f"{path}: tensor {key!r} is {t.dtype}, but a delta holds floating-point weights")
        if t.numel() == 0:
            raise UserError(f"{path}: tensor {key!r} is empty (shape {list(t.shape)}); re-export the delta")
    if looks_merged(wf.tensors):
        raise UserError(
            f"{path}: this is a full model (its normalization weights sit near 1), not a delta (near 0); "
            "subtract the base model first (training.extract_delta) and extract from that delta"
        )
    if wf.format.startswith("ldm"):
        return {ldm_key_map([k])[k]: t for k, t in wf.tensors.items()}, wf.metadata
    if wf.format.startswith("diffusers"):  # kohya names diffusers layers the same way; ComfyUI maps them
        return {k.removeprefix("unet."): t for k, t in wf.tensors.items()}, wf.metadata
    return wf.tensors, wf.metadata


def lora_vocabulary(meta: DeltaMetadata | None) -> dict[str, str]:
    """The delta's metadata in the LoRA vocabulary (training.export); the legacy cfg_mode values 'cfg_sync' and
    'cfg_fixed <g>' of older deltas become 'sync' and 'fixed' with cfg_scale."""
    if meta is None:
        return {}
    out = {k: v for k, v in meta.to_metadata().items() if k in ("parameterization", "num_windows", "base_hash")}
    out["base_architecture"] = meta.base_architecture
    mode = meta.cfg_mode.removeprefix("cfg_")
    if mode.startswith("fixed"):
        out["cfg_mode"], scale = "fixed", mode.removeprefix("fixed").strip()
        if scale:
            out["cfg_scale"] = scale
    elif mode:
        out["cfg_mode"] = mode
    if meta.steps_trained is not None:
        out["steps_trained"] = str(meta.steps_trained)
    if meta.training_summary is not None:
        out["training_summary"] = json.dumps(meta.training_summary, sort_keys=True)
    return out


def output_paths(delta: Path, out: Path | None, ranks: list[int], overwrite: bool) -> list[Path]:
    """One path per rank (several ranks: _r<rank> appended); refuses the input itself, a folder, and an existing
    file unless `overwrite`, all before anything is written."""
    out = out or delta.with_name(delta.stem + "_lora.safetensors")
    paths = [out] if len(ranks) == 1 else [out.with_name(f"{out.stem}_r{r}{out.suffix}") for r in ranks]
    for path in paths:
        if path.resolve() == delta.resolve() or (path.exists() and os.path.samefile(path, delta)):
            raise UserError(f"--out {path} is the input delta itself; pick another output file")
        if path.is_dir():
            raise UserError(f"--out {path} is a folder; give a file name")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{', '.join(existing)} exists already; pass --overwrite to replace it, or pick another --out")
    return paths


def main(argv: list[str] | None = None) -> list[dict]:
    """CLI: one LoRA file per rank; prints size and relative reconstruction error per rank."""
    p = ArgumentParser(prog="python -m training.extract_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("delta", type=Path, help="PeRFlow delta .safetensors")
    p.add_argument("--rank", type=int, nargs="+", default=[32], help=f"one or more ranks in 1..{MAX_RANK}")
    p.add_argument("--out", type=Path, default=None, help="output file (several ranks: _r<rank> is appended)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)
    if any(r < 1 or r > MAX_RANK for r in args.rank):
        p.error(f"--rank values must be integers in 1..{MAX_RANK}; got {args.rank}")
    if len(set(args.rank)) != len(args.rank):
        p.error(f"--rank lists a rank twice: {args.rank}")
    paths = output_paths(args.delta, args.out, args.rank, args.overwrite)
    delta, meta = delta_tensors(args.delta)
    rows = []
    for path, ex in zip(paths, extract_loras(delta, args.rank, DTYPES[args.dtype]), strict=True):
        if ex.clamped:
            smallest = min(ex.clamped.items(), key=lambda kv: kv[1])
            print(
                f"rank {ex.rank}: {len(ex.clamped)} of the delta's matrices allow fewer singular values and keep "
                f"their full rank (smallest: {smallest[0]} keeps {smallest[1]}); the file's metadata lists the ranks"
            )
        write_lora(
            path, ex.tensors, lora_vocabulary(meta) | {"perflow_lora_relative_error": f"{ex.relative_error:.6g}"}
        )
        size = sum(t.numel() * t.element_size() for t in ex.tensors.values())
        rows.append(
            {
                "rank": ex.rank,
                "file": str(path),
                "megabytes": round(size / 2**20, 3),
                "relative_error": ex.relative_error,
            }
        )
        print(f"rank {ex.rank:5d}  {size / 2**20:9.3f} MB  relative error {ex.relative_error:.5f}  {path}")
    print(json.dumps({"delta_megabytes": round(sum(t.numel() * 4 for t in delta.values()) / 2**20, 3)}))
    return rows


if __name__ == "__main__":
    run(main)
