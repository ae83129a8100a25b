"""A PeRFlow delta from a published merged model: dW = merged UNet - base UNet, for plug-and-play on any fine-tune.

    python -m training.extract_delta --merged perflow-sdxl-unet.safetensors --base sd_xl_base_1.0.safetensors \\
        --out ComfyUI/models/perflow/perflow-sdxl-delta.safetensors [--lora-rank 64]

Inputs are .safetensors: an LDM/ComfyUI-keyed checkpoint or UNet (`model.diffusion_model.*` / `diffusion_model.*`,
read without ComfyUI) or a diffusers UNet (`down_blocks.*`, optionally `unet.`-prefixed; its keys are mapped with
ComfyUI's own table, so this needs ComfyUI: run with ComfyUI's Python and COMFYUI_PATH set, or pass --comfyui).
Both are mapped to ComfyUI UNet keys and must describe the same architecture with the same shapes.

Memory: tensors are streamed one key at a time (two open files, one tensor of each in flight); what is held is the
delta itself (one UNet in --dtype) plus that one pair, in fp32 while subtracting.
"""

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from perflow_core.architecture import ARCH_NAMES, guess_architecture
from perflow_core.delta_format import save_delta, state_dict_hash
from perflow_core.delta_keys import diffusers_key_map, key_style, ldm_key_map
from perflow_core.parameterization import PARAMETERIZATIONS
from perflow_core.safetensors_file import read_header
from training.cli import ArgumentParser, UserError, run
from training.export import write_lora
from training.extract_lora import extract_loras

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SUPPORTED = ("sd15", "sd21", "sdxl")
UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


class UnetFile:
    """One input file: its key style ('ldm' or 'diffusers') and the shapes of its UNet tensors, from the header."""

    def __init__(self, path: Path, option: str):
        self.path, self.option = path, option
        header = read_header(path)  # validates the header; refuses pickles
        style = key_style(list(header.tensors), header.metadata)
        if style not in ("ldm", "diffusers"):
            what = "a PeRFlow delta already" if style == "perflow_delta" else "a LoRA"
            raise UserError(f"{option} {path} is {what}; give a full model (merged PeRFlow UNet or its base)")
        self.style = style
        self.shapes = {
            k: info.shape for k, info in header.tensors.items() if style == "diffusers" or k.startswith(UNET_PREFIXES)
        }
        self.architecture = guess_architecture(self.shapes)

    def unet_config_source(self) -> tuple[dict, str]:
        """(shape-only state dict, key prefix) for ComfyUI's model detection; tensors on the meta device."""
        prefix = (
            ""
            if self.style == "diffusers"
            else next(p for p in UNET_PREFIXES if any(k.startswith(p) for k in self.shapes))
        )
        strip = "unet." if self.style == "diffusers" else ""
        return {k.removeprefix(strip): torch.empty(s, device="meta") for k, s in self.shapes.items()}, prefix


def comfy_unet_config(files: list[UnetFile], comfyui: Path | None) -> dict:
    """The UNet config ComfyUI detects, from an LDM-keyed input if there is one (any size), else the diffusers one
    (ComfyUI recognises the full-size SD1.5 / SD2.1 / SDXL layouts there)."""
    from training.backends.comfy import import_comfy

    try:
        import_comfy(comfyui, torch.device("cpu"))
    except (FileNotFoundError, ImportError) as e:
        raise UserError(
            f"a diffusers-format input needs ComfyUI to map its keys ({e}); run with ComfyUI's Python and set "
            "COMFYUI_PATH (or --comfyui), or convert the input to an LDM/ComfyUI checkpoint"
        ) from None
    import comfy.model_detection

    ldm = next((f for f in files if f.style == "ldm"), None)
    if ldm is not None:
        sd, prefix = ldm.unet_config_source()
        config = comfy.model_detection.detect_unet_config(sd, prefix)
    else:
        config = comfy.model_detection.unet_config_from_diffusers_unet(files[0].unet_config_source()[0])
    if not config:
        raise UserError(f"ComfyUI does not recognise the UNet layout of {files[0].path}; is it an SD1.5/2.1/XL UNet?")
    return config


def comfy_key_map(f: UnetFile, unet_config: dict | None) -> dict[str, str]:
    """The file's keys -> ComfyUI model keys ('diffusion_model.*')."""
    if f.style == "ldm":
        return ldm_key_map(list(f.shapes))
    import comfy.utils

    return diffusers_key_map(list(f.shapes), comfy.utils.unet_to_diffusers(unet_config))


def check_pair(merged: UnetFile, base: UnetFile, maps: tuple[dict, dict]) -> dict[str, tuple[str, str]]:
    """Model key -> (merged key, base key); UserError when architectures, keys or shapes differ."""
    for f in (merged, base):
        if f.architecture not in SUPPORTED:
            raise UserError(
                f"{f.option} {f.path}: cannot tell its architecture (expected an SD1.5, SD2.1 or SDXL UNet)"
            )
    if merged.architecture != base.architecture:
        raise UserError(
            f"--merged is {ARCH_NAMES[merged.architecture]} but --base is {ARCH_NAMES[base.architecture]}; "
            "give the base the PeRFlow model was merged into"
        )
    by_model = []
    for f, key_map in zip((merged, base), maps, strict=True):
        unmapped = sorted(set(f.shapes) - set(key_map))
        if unmapped:
            raise UserError(f"{f.option} {f.path}: {len(unmapped)} keys are not UNet weights (e.g. {unmapped[0]})")
        by_model.append({mk: fk for fk, mk in key_map.items()})
    only_m, only_b = sorted(set(by_model[0]) - set(by_model[1])), sorted(set(by_model[1]) - set(by_model[0]))
    if only_m or only_b:
        ex = (only_m or only_b)[0]
        raise UserError(
            f"the UNets differ in their weights: {len(only_m)} only in --merged, {len(only_b)} only in --base "
            f"(e.g. {ex}); they are not the same architecture"
        )
    pairs = {mk: (by_model[0][mk], by_model[1][mk]) for mk in sorted(by_model[0])}
    bad = [(mk, merged.shapes[a], base.shapes[b]) for mk, (a, b) in pairs.items() if merged.shapes[a] != base.shapes[b]]
    if bad:
        mk, a, b = bad[0]
        raise UserError(
            f"{len(bad)} of {len(pairs)} UNet weights differ in shape (e.g. {mk}: merged {list(a)} vs base {list(b)}); "
            "they are not the same architecture"
        )
    return pairs


class LazyTensors(Mapping):
    """Tensors of an open safetensors file under other names, read only when asked for (one at a time)."""

    def __init__(self, handle, names: dict[str, str]):
        self.handle, self.names = handle, names

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(self.names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def stream_delta(merged: Path, base: Path, pairs: dict[str, tuple[str, str]], dtype: torch.dtype):
    """(dW per model key in `dtype`, base hash over the base's own tensors); one pair of tensors in memory at a time."""
    with safe_open(os.fspath(merged), "pt") as fm, safe_open(os.fspath(base), "pt") as fb:
        base_hash = state_dict_hash(LazyTensors(fb, {mk: b for mk, (_, b) in pairs.items()}))
        delta, changed = {}, 0
        for mk, (a, b) in tqdm(pairs.items(), desc="dW = merged - base", unit="key"):
            wm, wb = fm.get_tensor(a), fb.get_tensor(b)
            for path, w in ((merged, wm), (base, wb)):
                if not torch.isfinite(w).all():
                    raise UserError(f"{path}: tensor {mk} holds NaN or inf values; re-download or re-export the file")
            d = wm.float() - wb.float()
            changed += bool(d.any())
            delta[mk] = d.to(dtype)
            del wm, wb, d
    if not changed:
        raise UserError("--merged and --base hold identical UNet weights: there is no PeRFlow delta to extract")
    return delta, base_hash


def check_outputs(args) -> Path | None:
    """Refuse outputs that would overwrite an input or a file the user did not name; return the LoRA path."""
    inputs = {args.merged.resolve(), args.base.resolve()}
    lora = None
    if args.lora_rank is not None:
        lora = args.lora_out or args.out.with_name(f"{args.out.stem}_lora_r{args.lora_rank}{args.out.suffix}")
        if args.lora_out is None and lora.exists():
            raise UserError(f"{lora} exists already; name it with --lora-out to overwrite it, or pick another --out")
    for path in (args.out, lora):
        if path is not None and path.resolve() in inputs:
            raise UserError(f"{path} is one of the inputs; write the delta somewhere else")
    if lora is not None and lora.resolve() == args.out.resolve():
        raise UserError("--lora-out and --out are the same file")
    return lora


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m training.extract_delta", description=__doc__.split("\n\n")[0])
    p.add_argument("--merged", type=Path, required=True, help="merged PeRFlow model (.safetensors)")
    p.add_argument("--base", type=Path, required=True, help="the base model it was merged into (.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="the delta file to write (overwritten if it exists)")
    p.add_argument(
        "--parameterization",
        choices=PARAMETERIZATIONS,
        default="ddim_eps",
        help="recorded in the delta (published SDXL models: ddim_eps, SD2.1: velocity, SD1.5: diff_eps)",
    )
    p.add_argument("--num-windows", type=int, default=4, help="time windows K recorded in the delta (published: 4)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="dtype of the delta tensors")
    p.add_argument("--lora-rank", type=int, default=None, help="also write a kohya LoRA of this rank (SVD per layer)")
    p.add_argument("--lora-out", type=Path, default=None, help="LoRA file (default: <out>_lora_r<rank>.safetensors)")
    p.add_argument(
        "--comfyui", type=Path, default=None, help="ComfyUI folder for diffusers inputs (else $COMFYUI_PATH)"
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    """Extract and write the delta (and optionally a LoRA); returns a summary that is also printed as JSON."""
    args = parser().parse_args(argv)
    if not 1 <= args.num_windows <= 1000:
        raise UserError(f"--num-windows must be an integer in 1..1000; got {args.num_windows}")
    if args.lora_rank is not None and not 1 <= args.lora_rank <= 4096:
        raise UserError(f"--lora-rank must be an integer in 1..4096; got {args.lora_rank}")
    lora_path = check_outputs(args)
    merged, base = UnetFile(args.merged, "--merged"), UnetFile(args.base, "--base")
    diffusers = [f for f in (merged, base) if f.style == "diffusers"]
    config = comfy_unet_config([merged, base], args.comfyui) if diffusers else None
    pairs = check_pair(merged, base, (comfy_key_map(merged, config), comfy_key_map(base, config)))
    delta, base_hash = stream_delta(args.merged, args.base, pairs, DTYPES[args.dtype])
    meta = dict(
        parameterization=args.parameterization,
        num_windows=args.num_windows,
        base_architecture=base.architecture,
        base_hash=base_hash,
    )
    summary = json.dumps({"extracted_by": "training.extract_delta", "merged": args.merged.name, "base": args.base.name})
    save_delta(args.out, delta, **meta, extra={"training_summary": summary})
    result = {"delta": str(args.out), "keys": len(delta), "architecture": base.architecture, **meta}
    if lora_path is not None:
        (lora,) = extract_loras(delta, [args.lora_rank], DTYPES[args.dtype])
        info = {k: str(v) for k, v in meta.items()} | {"training_summary": summary}
        write_lora(lora_path, lora.tensors, info | {"perflow_lora_relative_error": f"{lora.relative_error:.6g}"})
        result |= {"lora": str(lora_path), "lora_relative_error": round(lora.relative_error, 6)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
