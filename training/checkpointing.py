"""Atomic training checkpoints (student, EMA, optimizer, scheduler, scaler, RNG states, step)."""

import os
import random
import tempfile
from pathlib import Path

import torch


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the target folder, fsync, then os.replace: never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_states() -> dict:
    """Python, torch CPU and (where present) CUDA generator states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    """Restore what rng_states() captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by atomic_torch_save (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=False)
