"""In-process ComfyUI for tests: COMFYUI_PATH points at a ComfyUI checkout; tests skip when it is unset.

comfy, nodes, execution and folder_paths are imported inside functions only, after setup_comfyui().
"""

import asyncio
import atexit
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-PeRFlow"
SKIP_REASON = "needs a real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout (e.g. COMFYUI_PATH=/work/comfyui)"
_STATE: dict = {}
ANIMATEDIFF_PACK = "ComfyUI-AnimateDiff-Evolved"
ANIMATEDIFF_SKIP_REASON = (
    "needs AnimateDiff-Evolved: set ANIMATEDIFF_PATH to a ComfyUI-AnimateDiff-Evolved checkout "
    "(e.g. ANIMATEDIFF_PATH=/work/animatediff)"
)


def require_comfyui() -> Path:
    """Return the ComfyUI root from COMFYUI_PATH, or skip the calling test when it is unset."""
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        pytest.skip(SKIP_REASON)
    root = Path(value).resolve()
    if not (root / "nodes.py").is_file() or not (root / "comfy").is_dir():
        raise RuntimeError(f"COMFYUI_PATH={value} is not a ComfyUI checkout (no nodes.py / comfy/)")
    return root


def setup_comfyui() -> Path:
    """Import ComfyUI once (CPU only, built-in extra nodes, temp model/IO dirs); return the temp base dir."""
    if "base" in _STATE:
        return _STATE["base"]
    root = require_comfyui()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import folder_paths

    base = Path(tempfile.mkdtemp(prefix="perflow-comfy-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    folder_paths.models_dir = str(base / "models")
    for name, (_, exts) in list(folder_paths.folder_names_and_paths.items()):
        if name not in ("configs", "custom_nodes"):
            folder_paths.folder_names_and_paths[name] = ([str(base / "models" / name)], exts)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(base / "custom_nodes")], set())
    for sub in ("output", "input", "temp", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_user_directory(str(base / "user"))
    # As main.py does: import ComfyUI's utils/ package before nodes.py puts comfy/ (with its utils.py) first on
    # sys.path; otherwise nodes_images.py (SaveAnimatedWEBP, ...) fails to import with "'utils' is not a package".
    import utils.install_util  # noqa: F401

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _STATE["builtin"] = set(nodes.NODE_CLASS_MAPPINGS)
    _STATE["base"] = base
    return base


def model_dir(kind: str) -> Path:
    """The (temporary) folder ComfyUI lists for a model kind such as 'checkpoints' or 'loras'."""
    import folder_paths

    base = setup_comfyui()
    paths = folder_paths.get_folder_paths(kind)  # a pack may list its own folder first (AnimateDiff-Evolved does)
    path = Path(next((p for p in paths if Path(p).is_relative_to(base)), paths[0]))
    path.mkdir(parents=True, exist_ok=True)
    return path


def add_model_file(kind: str, src: Path, name: str | None = None) -> str:
    """Symlink a file into the model folder of `kind` and return the name nodes take as input."""
    import folder_paths

    dst = model_dir(kind) / (name or Path(src).name)
    if not dst.exists():
        dst.symlink_to(Path(src).resolve())
    folder_paths.filename_list_cache.clear()
    return dst.name


def load_pack(pack_root: Path = REPO_ROOT, name: str = PACK_NAME) -> set:
    """Load a node pack the way ComfyUI does (custom_nodes/<name>); return the node ids it added."""
    import nodes

    setup_comfyui()
    pack_root = Path(pack_root).resolve()
    if not (pack_root / "__init__.py").is_file():
        raise RuntimeError(f"{pack_root} has no __init__.py, so it is not a ComfyUI node pack")
    link = _STATE["base"] / "custom_nodes" / name
    if link.is_symlink() and link.resolve() != pack_root:
        link.unlink()
    if not link.exists():
        link.symlink_to(pack_root, target_is_directory=True)
    ok = asyncio.run(nodes.load_custom_node(str(link), ignore=_STATE["builtin"], module_parent="custom_nodes"))
    if not ok:
        raise RuntimeError(f"IMPORT FAILED: node pack {pack_root} (ComfyUI logged the reason above)")
    mapping = getattr(sys.modules[str(link).replace(".", "_x_")], "NODE_CLASS_MAPPINGS", None)
    if mapping is None:  # a V3 pack (comfy_entrypoint): ComfyUI tags each node class with the pack it came from
        module = f"custom_nodes.{name}"
        return {
            k for k, cls in nodes.NODE_CLASS_MAPPINGS.items() if getattr(cls, "RELATIVE_PYTHON_MODULE", "") == module
        }
    return {k for k, cls in mapping.items() if nodes.NODE_CLASS_MAPPINGS.get(k) is cls}


def node(class_type: str):
    """A fresh instance of a registered node class."""
    import nodes

    setup_comfyui()
    return nodes.NODE_CLASS_MAPPINGS[class_type]()


def call(class_type: str, **inputs) -> tuple:
    """Call a node's FUNCTION directly: a V1 tuple, or a V3 NodeOutput (indexes and unpacks like one)."""
    obj = node(class_type)
    return getattr(obj, obj.FUNCTION)(**inputs)


def validate_prompt(prompt: dict) -> tuple:
    """execution.validate_prompt on an API-format prompt: (ok, error, output_ids, node_errors)."""
    import execution

    setup_comfyui()
    return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))


class _Server:
    """The few PromptServer members PromptExecutor touches; records sent events."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def run_prompt(prompt: dict) -> dict:
    """Validate and execute an API-format prompt in-process; return {node_id: ui output} or raise on failure."""
    import execution

    ok, error, outputs, node_errors = validate_prompt(prompt)
    if not ok:
        raise RuntimeError(f"prompt failed validation: {error} {node_errors}")
    executor = execution.PromptExecutor(_Server())
    executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        raise RuntimeError(f"prompt execution failed: {errors}")
    return executor.history_result["outputs"]


def require_animatediff() -> Path:
    """Return the AnimateDiff-Evolved folder from ANIMATEDIFF_PATH, or skip the calling test when it is unset."""
    value = os.environ.get("ANIMATEDIFF_PATH")
    if not value:
        pytest.skip(ANIMATEDIFF_SKIP_REASON)
    root = Path(value).resolve()
    if not (root / "animatediff" / "nodes_gen2.py").is_file():
        raise RuntimeError(f"ANIMATEDIFF_PATH={value} is not a ComfyUI-AnimateDiff-Evolved checkout")
    return root


def load_animatediff() -> set:
    """Load AnimateDiff-Evolved (ANIMATEDIFF_PATH) next to this pack, as custom_nodes/ComfyUI-AnimateDiff-Evolved."""
    root = require_animatediff()
    require_comfyui()
    if "animatediff" not in _STATE:
        _STATE["animatediff"] = load_pack(root, ANIMATEDIFF_PACK)
    return _STATE["animatediff"]
