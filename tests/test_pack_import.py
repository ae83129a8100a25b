"""Without ComfyUI (runs in CI): importing the pack on a ComfyUI too old for it logs one line and offers no nodes,
instead of failing at import or mid-prompt. The only stand-ins are what such a ComfyUI lacks: a WrappersMP without
PREDICT_NOISE, and its version file. tests/test_nodes_v3.py checks the same against a real ComfyUI."""

import importlib.util
import logging
import sys
import types
from unittest.mock import patch

import pytest
import torch  # noqa: F401  (imported before patch.dict, which drops modules first imported inside it: torch can't be re-imported)

from comfy_env import REPO_ROOT


@pytest.mark.parametrize("has_patcher_extension", [True, False])
def test_too_old_comfyui_logs_one_line_and_offers_no_nodes(caplog, has_patcher_extension):
    old = {"comfy": types.ModuleType("comfy"), "comfyui_version": types.ModuleType("comfyui_version")}
    old["comfyui_version"].__version__ = "0.3.40"
    if has_patcher_extension:  # 0.3.10 .. 0.3.51: there, but without the wrapper the CFG schedule needs
        old["comfy.patcher_extension"] = types.ModuleType("comfy.patcher_extension")
        old["comfy.patcher_extension"].WrappersMP = type("WrappersMP", (), {"OUTER_SAMPLE": "outer_sample"})
    else:  # None makes the import fail even where a real ComfyUI was imported earlier in this process
        old["comfy.patcher_extension"] = None
    spec = importlib.util.spec_from_file_location("perflow_pack_ci", REPO_ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    with patch.dict(sys.modules, {**old, spec.name: module}), caplog.at_level(logging.ERROR, logger="perflow"):
        before = set(sys.modules)
        spec.loader.exec_module(module)
        imported_comfy_api = any(name.startswith("comfy_api") for name in set(sys.modules) - before)
    [line] = [r.getMessage() for r in caplog.records if r.name == "perflow"]
    assert "needs ComfyUI >= 0.3.52" in line and "this one is 0.3.40" in line and "Update ComfyUI" in line
    assert not hasattr(module, "comfy_entrypoint") and not hasattr(module, "NODE_CLASS_MAPPINGS")
    assert not imported_comfy_api  # the V3 API is not touched before the version is known to have it
