"""Atomic training checkpoints (student, EMA, optimizer, scheduler, scaler, RNG states, step)."""

import random
from pathlib import Path

import torch

from perflow_core.atomic_file import atomic_path


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the target folder, fsync, then os.replace: never a partial file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers: no code
