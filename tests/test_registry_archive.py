"""What a Comfy Registry install gets: the archive `comfy node pack` builds from the committed files.

Needs comfy-cli (PyPI `comfy-cli`, best in its own venv): set COMFY_CLI to its `comfy` executable or put `comfy` on
PATH; skips otherwise. Packs a clone of HEAD, so it checks what is committed.
"""

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Runtime files of the pack: what ComfyUI imports, what pip installs from, and what the registry page reads.
RUNTIME = ["__init__.py", "requirements.txt", "pyproject.toml", "LICENSE", "README.md", "assets/icon.svg"]
RUNTIME_DIRS = ["nodes", "perflow_core", "workflows"]
# Benchmark results, training data, the toy teacher and development files stay out.
EXCLUDED_DIRS = ["results", "training/data", "training/teacher", "tests", "benchmarks", "tools", ".ci", ".github"]


def comfy_cli() -> str:
    exe = os.environ.get("COMFY_CLI") or shutil.which("comfy")
    if not exe:
        pytest.skip("needs comfy-cli: set COMFY_CLI to its `comfy` executable (pip install comfy-cli in a venv)")
    return exe


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> list[str]:
    exe = comfy_cli()
    clone = tmp_path_factory.mktemp("pack") / "ComfyUI-PeRFlow"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {**os.environ, "DO_NOT_TRACK": "1"}
    run = subprocess.run(
        [exe, "--skip-prompt", "node", "pack"], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    with zipfile.ZipFile(clone / "node.zip") as z:
        return z.namelist()


def test_archive_holds_the_pack(archive):
    tracked = subprocess.run(["git", "ls-files", *RUNTIME_DIRS], cwd=REPO, capture_output=True, text=True, check=True)
    for name in RUNTIME + tracked.stdout.split():
        assert name in archive, f"{name} is missing from the registry archive (check .comfyignore)"


def test_archive_leaves_out_results_data_and_dev_files(archive):
    for folder in EXCLUDED_DIRS:
        inside = [n for n in archive if n.startswith(folder + "/")]
        assert not inside, f"{folder}/ should not be in the registry archive: {inside[:3]}"
    assert not [n for n in archive if n.endswith((".npz", ".pt", ".ckpt", ".safetensors"))]


def test_validate_passes_offline():
    exe = comfy_cli()
    env = {**os.environ, "DO_NOT_TRACK": "1"}
    run = subprocess.run(
        [exe, "--skip-prompt", "node", "validate"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    out = run.stdout + run.stderr  # comfy-cli prints its verdict on stderr
    assert run.returncode == 0 and "validation checks passed" in out and "Security warnings" not in out, out
