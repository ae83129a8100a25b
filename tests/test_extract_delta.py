"""training.extract_delta on small synthetic LDM-keyed files (no ComfyUI): the arithmetic, the metadata, the LoRA,
and the refusals, each one `error:` line with exit status 2 and no file written."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from perflow_core.delta_format import state_dict_hash
from perflow_core.delta_keys import read_weight_file
from training.cli import run
from training.extract_delta import main

REPO = Path(__file__).resolve().parents[1]
UNET = "model.diffusion_model."
# An SDXL-like UNet fragment: attn2.to_k takes the 2048-wide SDXL text context.
SHAPES = {
    "input_blocks.0.0.weight": (8, 4, 3, 3),
    "input_blocks.0.0.bias": (8,),
    "input_blocks.1.1.norm.weight": (8,),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    "out.2.weight": (4, 8, 3, 3),
}


def tensors(seed: int, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).half() for k, s in shapes.items()}


def write(path: Path, sd: dict, metadata=None) -> Path:
    save_file(sd, str(path), metadata=metadata)
    return path


@pytest.fixture
def pair(tmp_path):
    """(merged, base): base is a full LDM checkpoint (UNet + a VAE key), merged a 'diffusion_model.' UNet file."""
    base_w = tensors(0)
    dw = {k: 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for k, t in base_w.items()}
    merged_w = {k: (t.float() + dw[k]).half() for k, t in base_w.items()}
    base = write(
        tmp_path / "base.safetensors",
        {UNET + k: t for k, t in base_w.items()} | {"first_stage_model.decoder.conv_in.weight": torch.ones(2, 2)},
    )
    merged = write(tmp_path / "merged.safetensors", {"diffusion_model." + k: t for k, t in merged_w.items()})
    return merged, base


def cli(*argv) -> tuple[int, str]:
    """Run the CLI in-process the way `python -m training.extract_delta` does: (exit status, stderr)."""
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        try:
            run(lambda: main([str(a) for a in argv]))
        except SystemExit as e:
            return e.code, err.getvalue()
    return 0, err.getvalue()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_delta_is_merged_minus_base_with_metadata(pair, tmp_path):
    merged, base = pair
    out = tmp_path / "d.safetensors"
    assert cli("--merged", merged, "--base", base, "--out", out, "--dtype", "fp32")[0] == 0
    wf = read_weight_file(out)
    assert wf.format == "perflow_delta" and wf.architecture == "sdxl"
    md = wf.metadata
    assert (md.parameterization, md.num_windows, md.base_architecture) == ("ddim_eps", 4, "sdxl")
    with safe_open(str(merged), "pt") as fm, safe_open(str(base), "pt") as fb:
        want = {"diffusion_model." + k: fm.get_tensor("diffusion_model." + k).float() for k in SHAPES}
        base_unet = {"diffusion_model." + k: fb.get_tensor(UNET + k) for k in SHAPES}
    assert set(wf.tensors) == set(want)
    for k, t in wf.tensors.items():
        torch.testing.assert_close(t, want[k] - base_unet[k].float(), rtol=0, atol=0)
    assert md.base_hash == state_dict_hash(base_unet)


def test_parameterization_windows_and_dtype_are_recorded(pair, tmp_path):
    merged, base = pair
    out = tmp_path / "d.safetensors"
    argv = ["--merged", merged, "--base", base, "--out", out, "--parameterization", "velocity", "--num-windows", "2"]
    assert cli(*argv)[0] == 0
    wf = read_weight_file(out)
    assert (wf.metadata.parameterization, wf.metadata.num_windows) == ("velocity", 2)
    assert {t.dtype for t in wf.tensors.values()} == {torch.float16}


def test_lora_at_full_rank_reconstructs_the_delta(pair, tmp_path):
    merged, base = pair
    out = tmp_path / "d.safetensors"
    assert cli("--merged", merged, "--base", base, "--out", out, "--dtype", "fp32", "--lora-rank", "2048")[0] == 0
    lora = tmp_path / "d_lora_r2048.safetensors"
    wf = read_weight_file(lora)
    assert wf.format == "kohya_lora"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
        up, down = f.get_tensor(name + ".lora_up.weight"), f.get_tensor(name + ".lora_down.weight")
    # extract_lora keeps at most what each matrix allows: 8 here (every weight has 8 output rows)
    assert (meta["perflow_format"], meta["parameterization"], meta["perflow_lora_rank"]) == ("lora", "ddim_eps", "8")
    delta = read_weight_file(out).tensors["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    torch.testing.assert_close(up.float() @ down.float(), delta, rtol=1e-4, atol=1e-5)


def refusal_cases(tmp_path, merged, base):
    """(argv, what the error names) for each class of bad input; inputs are built here."""
    sd15 = write(
        tmp_path / "sd15.safetensors",
        {UNET + k: t for k, t in tensors(2, SHAPES | {SHAPES_TO_K: (8, 768)}).items()},
    )
    other_shape = write(
        tmp_path / "shape.safetensors",
        {UNET + k: t for k, t in tensors(2, SHAPES | {"out.2.weight": (4, 8, 1, 1)}).items()},
    )
    extra_key = write(
        tmp_path / "extra.safetensors", {UNET + k: t for k, t in tensors(2, SHAPES | {"out.0.weight": (8,)}).items()}
    )
    with safe_open(str(base), "pt") as f:
        same = write(tmp_path / "same.safetensors", {k: f.get_tensor(k) for k in f.keys() if k.startswith(UNET)})
    nan = tensors(3)
    nan["out.2.weight"][0, 0, 0, 0] = float("nan")
    nan = write(tmp_path / "nan.safetensors", {UNET + k: t for k, t in nan.items()})
    delta_meta = {
        "perflow_format": "delta", "perflow_format_version": "1", "parameterization": "ddim_eps",
        "num_windows": "4", "base_architecture": "sdxl", "base_hash": "0" * 64,
    }  # fmt: skip
    delta = write(
        tmp_path / "delta.safetensors", {"diffusion_model." + k: t for k, t in tensors(4).items()}, delta_meta
    )
    pickled = tmp_path / "model.ckpt"
    torch.save({"a": torch.ones(1)}, pickled)
    out = tmp_path / "out.safetensors"
    (tmp_path / "out_lora_r4.safetensors").write_bytes(b"user's file")
    return {
        "architecture": (["--merged", sd15, "--base", base, "--out", out], "SD1.5 but --base is SDXL"),
        "shape": (["--merged", other_shape, "--base", base, "--out", out], "differ in shape"),
        "keys": (["--merged", extra_key, "--base", base, "--out", out], "only in --merged"),
        "identical": (["--merged", same, "--base", base, "--out", out], "identical"),
        "nan": (["--merged", nan, "--base", base, "--out", out], "NaN"),
        "delta input": (["--merged", delta, "--base", base, "--out", out], "a PeRFlow delta already"),
        "pickle": (["--merged", pickled, "--base", base, "--out", out], "pickle"),
        "missing": (["--merged", tmp_path / "nope.safetensors", "--base", base, "--out", out], "cannot be read"),
        "out is input": (["--merged", merged, "--base", base, "--out", base], "one of the inputs"),
        "lora exists": (["--merged", merged, "--base", base, "--out", out, "--lora-rank", "4"], "--lora-out"),
        "windows": (["--merged", merged, "--base", base, "--out", out, "--num-windows", "0"], "--num-windows"),
        "option": (["--merged", merged, "--base", base, "--out", out, "--parameterization", "eps"], "invalid choice"),
        "required": (["--merged", merged, "--out", out], "--base"),
    }


SHAPES_TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CASES = (
    "architecture", "shape", "keys", "identical", "nan", "delta input", "pickle", "missing", "out is input",
    "lora exists", "windows", "option", "required",
)  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_nothing_is_written(pair, tmp_path, case):
    merged, base = pair
    argv, names = refusal_cases(tmp_path, merged, base)[case]
    before = {p: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    status, err = cli(*argv)
    assert status == 2
    lines = err.splitlines()  # a tqdm progress bar may come before the error
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1
    assert "Traceback" not in err and names in lines[-1]
    assert {p: digest(p) for p in tmp_path.iterdir() if p.is_file()} == before  # no new, changed or removed file


def test_diffusers_input_without_comfyui_names_comfyui_path(pair, tmp_path):
    """Through the real entry point, in a fresh interpreter with no ComfyUI on the path."""
    merged, base = pair
    with safe_open(str(merged), "pt") as f:
        diffusers = write(
            tmp_path / "unet.safetensors", {"down_blocks.0.resnets.0.conv1.weight": f.get_tensor(f.keys()[0])}
        )
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "training.extract_delta", "--merged", diffusers, "--base", base, "--out",
         tmp_path / "d.safetensors"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "COMFYUI_PATH" in proc.stderr
    assert not (tmp_path / "d.safetensors").exists()
