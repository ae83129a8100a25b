"""The tools/ command lines end a user's mistake in one `error:` line with exit status 2, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "unknown command": (["tools.workflows_tool", "nope"], {}, "invalid choice"),
    "unknown option": (["tools.build_workflows", "--bogus"], {}, "--bogus"),
    "no ComfyUI": (["tools.build_workflows"], {"COMFYUI_PATH": None}, "COMFYUI_PATH"),
    "ComfyUI path not a checkout": (["tools.build_workflows"], {"COMFYUI_PATH": "/nonexistent"}, "/nonexistent"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tool_user_error_is_one_line_exit_2(case):
    argv, env_changes, words = CASES[case]
    env = {k: v for k, v in os.environ.items() if k not in env_changes}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr
