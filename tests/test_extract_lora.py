"""training.extract_lora: delta -> kohya LoRA by truncated SVD. The error falls with rank and full rank
reconstructs; a user's files are never overwritten unless named with --overwrite; what is not a floating-point
delta is refused; fp16 factors never hold inf and the error reported is the error of the file written; a rank
above what a matrix allows is clamped, said, and recorded. Every mistake ends in one `error:` line, exit 2."""

import io
import math
import os
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from perflow_core.delta_format import save_delta
from training.cli import run
from training.extract_lora import extract_loras, main
from training.lora import kohya_name, lora_product

REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SHAPES = {
    "diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
    "diffusion_model.input_blocks.0.0.bias": (32,),
    "diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (32, 32),
    "diffusion_model.input_blocks.1.1.norm.weight": (32,),
    "diffusion_model.time_embed.0.weight": (128, 32),
}


def fake_delta(scale: float = 1e-3, shapes: dict = SHAPES, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random dW; norm weights centred on 0 at any scale, as in a delta (a mean near 1 marks a full model)."""
    g = torch.Generator().manual_seed(seed)
    delta = {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}
    return {k: t - t.mean() if ".norm." in k else t for k, t in delta.items()}


def write_delta(path: Path, delta: dict[str, torch.Tensor], cfg_mode: str = "cfg_sync") -> Path:
    save_delta(
        path, delta, parameterization="diff_eps", num_windows=4, base_architecture="sd15", base_hash="a" * 64,
        extra={"cfg_mode": cfg_mode, "steps_trained": "30"},
    )  # fmt: skip
    return path


def cli(*argv) -> tuple[int, str, str]:
    """Run the command line in-process as `python -m training.extract_lora` would: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            run(lambda: main([str(a) for a in argv]))
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_refused(code: int, err: str, *words: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def comfy_apply(lora: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's LoRA arithmetic: alpha / rank * up.flatten(1) @ down.flatten(1), reshaped; diff, diff_b as is."""
    out = {}
    for key, d in delta.items():
        n = kohya_name(key)
        if key.endswith(".bias"):
            out[key] = lora[f"{n}.diff_b"].float()
        elif f"{n}.diff" in lora:
            out[key] = lora[f"{n}.diff"].float()
        else:
            up, down = lora[f"{n}.lora_up.weight"], lora[f"{n}.lora_down.weight"]
            out[key] = lora_product(up, down, lora[f"{n}.alpha"].item(), d.shape)
    return out


def file_error(lora: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> float:
    """The relative Frobenius error of a LoRA file against the delta, recomputed from the file's tensors."""
    applied = comfy_apply(lora, delta)
    num = sum((applied[k] - d.float()).pow(2).sum().item() for k, d in delta.items())
    return math.sqrt(num / sum(d.float().pow(2).sum().item() for d in delta.values()))


def test_error_falls_with_rank_and_full_rank_reconstructs():
    delta = fake_delta()
    runs = extract_loras(delta, [1, 2, 4, 8, 16, 36], torch.float32)
    errors = [r.relative_error for r in runs]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    (full,) = extract_loras(delta, [128], torch.float32)
    assert full.relative_error < 1e-6
    for k, v in comfy_apply(full.tensors, delta).items():
        torch.testing.assert_close(v, delta[k], atol=1e-8, rtol=1e-4)


def test_kohya_keys_and_conv_shapes():
    (run4,) = extract_loras(fake_delta(), [4], torch.float16)
    lora, n = run4.tensors, "lora_unet_input_blocks_0_0"
    assert lora[f"{n}.lora_down.weight"].shape == (4, 4, 3, 3)
    assert lora[f"{n}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert lora[f"{n}.alpha"].item() == 4 and lora[f"{n}.diff_b"].shape == (32,)
    assert lora["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert lora["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight"].shape == (32, 4)
    assert lora["lora_unet_input_blocks_1_1_norm.diff"].shape == (32,)
    assert {v.dtype for k, v in lora.items() if not k.endswith(".alpha")} == {torch.float16}


def test_cli_writes_one_file_per_rank_with_the_lora_vocabulary(tmp_path):
    path = write_delta(tmp_path / "delta.safetensors", fake_delta(), cfg_mode="cfg_fixed 4.5")
    code, out, err = cli(path, "--rank", "2", "8", "--out", tmp_path / "lora.safetensors", "--dtype", "fp32")
    assert code == 0, err
    assert "relative error" in out
    with safe_open(tmp_path / "lora_r2.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["perflow_format"] == "lora" and meta["parameterization"] == "diff_eps"
    assert (meta["num_windows"], meta["base_architecture"], meta["steps_trained"]) == ("4", "sd15", "30")
    assert (meta["cfg_mode"], meta["cfg_scale"]) == ("fixed", "4.5")  # the legacy "cfg_fixed 4.5", as CONTRACTS
    assert meta["ss_network_dim"] == meta["perflow_lora_rank"] == "2"
    assert load_file(tmp_path / "lora_r2.safetensors")["lora_unet_time_embed_0.alpha"].item() == 2
    errors = [float(safe_open(tmp_path / f"lora_r{r}.safetensors", "pt").metadata()["perflow_lora_relative_error"])
              for r in (2, 8)]  # fmt: skip
    assert errors[0] > errors[1] > 0


@pytest.mark.parametrize("ranks", [["4"], ["4", "8"]])
def test_out_naming_the_input_is_refused(tmp_path, ranks):
    """--out that is the input (directly, via a symlink, or as one of the _r<rank> outputs), even with --overwrite."""
    delta = write_delta(tmp_path / ("d_r4.safetensors" if len(ranks) > 1 else "d.safetensors"), fake_delta())
    link = tmp_path / ("link_r4.safetensors" if len(ranks) > 1 else "link.safetensors")
    link.symlink_to(delta)
    outs = ["d.safetensors", "link.safetensors"] if len(ranks) > 1 else [delta.name, link.name]
    for out in outs:
        before = snapshot(tmp_path)
        for extra in ([], ["--overwrite"]):
            code, _, err = cli(delta, "--rank", *ranks, "--out", tmp_path / out, *extra)
            assert_refused(code, err, "input delta itself")
            assert snapshot(tmp_path) == before


@PROPERTY
@given(ranks=st.lists(st.integers(1, 40), min_size=1, max_size=4, unique=True), data=st.data())
def test_existing_outputs_are_never_replaced_without_overwrite(ranks, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        delta = write_delta(folder / "delta.safetensors", fake_delta())
        out = folder / "lora.safetensors"
        names = [out] if len(ranks) == 1 else [out.with_name(f"lora_r{r}.safetensors") for r in ranks]
        taken = data.draw(st.sets(st.sampled_from(names), min_size=1))
        for i, p in enumerate(sorted(taken)):
            p.write_bytes(b"the user's file %d" % i)
        before = snapshot(folder)
        code, _, err = cli(delta, "--rank", *ranks, "--out", out)
        assert_refused(code, err, "--overwrite", *(str(p) for p in taken))
        assert snapshot(folder) == before  # nothing replaced, nothing new
        code, _, err = cli(delta, "--rank", *ranks, "--out", out, "--overwrite")
        assert code == 0, err
        assert all(p.read_bytes() != before[p.name] for p in taken)


def test_a_full_model_is_refused(tmp_path):
    """Norm weights near 1 mean a model, not a difference of models: as a PeRFlow file, a ComfyUI UNet or a full
    checkpoint (model.diffusion_model. keys)."""
    model = fake_delta(scale=0.02) | {"diffusion_model.input_blocks.1.1.norm.weight": torch.ones(32) + 0.01}
    files = {"perflow.safetensors": None, "unet.safetensors": "", "checkpoint.safetensors": "model."}
    for name, prefix in files.items():
        if prefix is None:
            write_delta(tmp_path / name, model)
        else:
            save_file({prefix + k: v for k, v in model.items()}, tmp_path / name)
        code, _, err = cli(tmp_path / name, "--out", tmp_path / "out.safetensors")
        assert_refused(code, err, name, "full model")
        assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_and_bool_tensors_are_refused(tmp_path, dtype):
    """As a PeRFlow delta (its metadata) and as a bare LDM-keyed delta."""
    meta = safe_open(write_delta(tmp_path / "ok.safetensors", fake_delta()), "pt").metadata()
    delta = fake_delta() | {"diffusion_model.input_blocks.0.0.bias": torch.ones(32, dtype=dtype)}
    for name, metadata in (("perflow.safetensors", meta), ("ldm.safetensors", None)):
        save_file(delta, tmp_path / name, metadata=metadata)
        code, _, err = cli(tmp_path / name, "--out", tmp_path / "out.safetensors")
        assert_refused(code, err, name, "input_blocks.0.0.bias", "floating-point")
        assert not (tmp_path / "out.safetensors").exists()


def test_a_lora_is_not_extracted_again(tmp_path):
    write_delta(tmp_path / "delta.safetensors", fake_delta())
    assert cli(tmp_path / "delta.safetensors", "--out", tmp_path / "lora.safetensors")[0] == 0
    code, _, err = cli(tmp_path / "lora.safetensors", "--out", tmp_path / "again.safetensors")
    assert_refused(code, err, "LoRA already")


@PROPERTY
@given(
    exponent=st.floats(-9, 7),
    dtype=st.sampled_from(["fp16", "bf16", "fp32"]),
    rank=st.sampled_from([1, 4, 64]),
)
def test_factors_never_hold_inf_and_the_reported_error_is_the_files(exponent, dtype, rank):
    """At any delta magnitude: either refused (values beyond the dtype's range), or a finite file whose reported
    error is the error of its own tensors (fp16 rounding and underflow included)."""
    delta = fake_delta(scale=10.0**exponent)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = write_delta(Path(tmp) / "delta.safetensors", delta), Path(tmp) / "lora.safetensors"
        code, _, err = cli(src, "--rank", rank, "--dtype", dtype, "--out", out)
        if code != 0:
            assert dtype == "fp16" and exponent > 3
            assert_refused(code, err, "beyond the range", "--dtype fp32")
            assert not out.exists()
            return
        lora = load_file(out)
        reported = float(safe_open(out, "pt").metadata()["perflow_lora_relative_error"])
    assert all(torch.isfinite(t).all() for t in lora.values())
    assert reported == pytest.approx(file_error(lora, delta), rel=1e-3, abs=1e-6)


def test_an_fp16_overflow_names_the_layer_and_the_fix(tmp_path):
    src = write_delta(tmp_path / "delta.safetensors", fake_delta(scale=1e6))
    code, _, err = cli(src, "--dtype", "fp16", "--out", tmp_path / "lora.safetensors")
    assert_refused(code, err, "diffusion_model.", "beyond the range of torch.float16", "--dtype fp32 or bf16")


@PROPERTY
@given(
    dims=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 3])), min_size=1, max_size=4),
    rank=st.integers(1, 40),
)
def test_a_rank_above_a_matrix_is_clamped_said_and_recorded(dims, rank):
    shapes = {f"diffusion_model.layer{i}.weight": (o, c, k, k) if k > 1 else (o, c) for i, (o, c, k) in enumerate(dims)}
    delta = fake_delta(shapes=shapes)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = write_delta(Path(tmp) / "delta.safetensors", delta), Path(tmp) / "lora.safetensors"
        code, stdout, err = cli(src, "--rank", rank, "--dtype", "fp32", "--out", out)
        assert code == 0, err
        lora = load_file(out)
        meta = safe_open(out, "pt").metadata()
    kept = {kohya_name(k): min(rank, s[0], math.prod(s[1:])) for k, s in shapes.items()}
    assert {n: lora[f"{n}.lora_down.weight"].shape[0] for n in kept} == kept
    assert all(lora[f"{n}.alpha"].item() == r for n, r in kept.items())  # scale alpha / rank stays 1
    assert meta["perflow_lora_rank"] == str(max(kept.values()))
    assert meta["ss_network_dim"] == (str(rank) if set(kept.values()) == {rank} else meta["ss_network_dim"])
    if len(set(kept.values())) > 1:
        assert meta["ss_network_dim"] == "Dynamic" and "perflow_lora_ranks" in meta
    assert ("keep their full rank" in stdout) == any(r < rank for r in kept.values())
    assert float(meta["perflow_lora_relative_error"]) == pytest.approx(file_error(lora, delta), abs=1e-5)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["missing.safetensors"], ["missing.safetensors"]),
        (["folder"], ["folder"]),
        (["junk.safetensors"], ["junk.safetensors", "not a safetensors"]),
        (["delta.safetensors", "--rank", "0"], ["--rank"]),
        (["delta.safetensors", "--rank", "4", "4"], ["twice"]),
        (["delta.safetensors", "--rank", "x"], ["--rank"]),
        (["delta.safetensors", "--dtype", "fp8"], ["--dtype"]),
        (["delta.safetensors", "--out", "folder"], ["folder"]),
    ],
)
def test_every_mistake_is_one_error_line(tmp_path, args, words):
    write_delta(tmp_path / "delta.safetensors", fake_delta())
    (tmp_path / "folder").mkdir()
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    os.chdir(tmp_path)
    code, _, err = cli(*args)
    assert_refused(code, err, *words)


def test_the_module_runs_as_a_script_and_refuses_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "training.extract_lora", str(tmp_path / "missing.safetensors")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_stock_lora_loader_and_our_loader_apply_the_export_alike(tmp_path):
    """With COMFYUI_PATH: a full-rank export of a delta for a tiny SD1.5 checkpoint, loaded by the stock
    LoraLoaderModelOnly node and by the PeRFlow Delta Loader, moves every UNet weight by the delta, identically."""
    import comfy_env

    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()
    import comfy.sd

    from checkpoints import checkpoint_path
    from training.export import write_lora

    ckpt = checkpoint_path("sd15")
    model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
    base = {k: v.float().clone() for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    g = torch.Generator().manual_seed(0)
    ends = ("input_blocks.0.0.weight", "input_blocks.0.0.bias", "proj_in.weight", "to_q.weight", "out.2.weight")
    picked = [k for k in base if k.endswith(ends)]
    picked += [k for k in base if k.endswith("norm.weight")][:1]
    delta = {k: torch.randn(base[k].shape, generator=g) * 1e-2 for k in picked}
    (full,) = extract_loras(delta, [4096], torch.float32)
    assert full.relative_error < 1e-5
    write_lora(tmp_path / "perflow_lora.safetensors", full.tensors, {})
    assert {k.rsplit(".", 1)[-1] for k in full.tensors} == {"weight", "alpha", "diff", "diff_b"}
    name = comfy_env.add_model_file("loras", tmp_path / "perflow_lora.safetensors", "perflow-test-export.safetensors")
    (stock,) = comfy_env.call("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)
    ours, summary = comfy_env.call(
        "PeRFlowDeltaLoader", model=model, delta_name="loras/" + name, strength=1.0,
        parameterization="diff_eps", num_windows=4,
    )  # fmt: skip
    assert "kohya_lora," in summary and f"SD1.5 model; {len(picked)} weights patched" in summary
    weights = {}
    for label, patcher in (("stock", stock), ("ours", ours)):
        patcher.patch_model()
        weights[label] = {k: v.float().clone() for k, v in patcher.model.state_dict().items() if k in base}
        patcher.unpatch_model()
    for k in base:
        expected = base[k] + delta[k] if k in delta else base[k]
        tol = 2e-3 * max(1.0, base[k].abs().max().item())  # the checkpoint's weights are fp16
        torch.testing.assert_close(weights["stock"][k], expected, atol=tol, rtol=0, msg=k)
        torch.testing.assert_close(weights["ours"][k], weights["stock"][k], atol=0, rtol=0, msg=k)
