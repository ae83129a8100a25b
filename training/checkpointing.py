"""A run's folder and checkpoints: atomic checkpoints (student, EMA, optimizer, scheduler, scaler, RNG states, step),
one trainer per folder (a lock), no finished run replaced unless asked, and a resume only with the same settings."""

import os
import random
from pathlib import Path

import torch

from perflow_core.atomic_file import atomic_path
from training.cli import UserError

CHECKPOINT = "checkpoint.pt"
# Files of a run that a new run would replace: refused without --resume / --overwrite.
RUN_FILES = (CHECKPOINT, "perflow_delta.safetensors", "perflow_lora.safetensors", "metrics.json")


def claim_run_folder(out: Path, *, resume: bool, overwrite: bool):
    """Create `out`, take its lock (a second trainer on the same folder is refused), refuse a used folder unless
    resume or overwrite, and delete the partial files a killed run left. Returns the open lock file: keep it
    referenced for the whole run (the operating system releases the lock when the process ends, even on kill -9)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the run")
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "a+")  # noqa: SIM115 - held open for the whole run
    try:
        import fcntl

        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(
            f"another trainer is writing to {out} (its lock {out / '.lock'} is held); wait for it to "
            "finish or pick another --out"
        ) from None
    except ImportError:  # no fcntl (Windows): run without the lock
        pass
    used = [name for name in RUN_FILES if (out / name).exists()]
    if used and not (resume or overwrite):
        lock.close()
        raise UserError(
            f"--out {out} holds a run ({', '.join(used)}); continue it with --resume, replace it with "
            "--overwrite, or pick another --out"
        )
    if overwrite:
        for name in used:
            (out / name).unlink()
    for partial in out.glob(".*.tmp"):  # temporary files of an atomic write killed half-way (kill -9, power loss)
        partial.unlink()
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the target folder, fsync, then os.replace: never a partial file."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's writer reports a full disk as a RuntimeError
            raise OSError(f"could not write {path} ({e}); free disk space or write somewhere else") from None


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
    """Read a checkpoint written by atomic_torch_save (tensors and plain containers only: no code runs)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}: nothing to resume; start the run without --resume") from None
    except Exception as e:  # noqa: BLE001 - torch reports a truncated or foreign file in many ways
        raise UserError(
            f"{path} is not a readable training checkpoint ({type(e).__name__}); it may be truncated or "
            "from another program: start again with --overwrite or another --out"
        ) from None
    if not isinstance(ck, dict) or not {"step", "settings", "engine", "rng"} <= ck.keys():
        raise UserError(f"{path} is not a checkpoint of this trainer; start again with --overwrite or another --out")
    return ck


def check_resume(saved: dict, now: dict, steps: int, saved_step: int) -> None:
    """Refuse a resume whose settings differ from the run's (the result would not be the run continued), naming
    the first different setting and both values; and a --steps the run has already passed."""
    for key in sorted(saved.keys() | now.keys()):
        if saved.get(key) != now.get(key):
            raise UserError(
                f"--resume: {key} is {now.get(key)!r} but the run in the checkpoint used "
                f"{saved.get(key)!r}; resume with the run's settings or start a new --out"
            )
    if steps < saved_step:
        raise UserError(
            f"--resume: --steps {steps} is below the checkpoint's step {saved_step}; pass --steps {saved_step} or more"
        )


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse NaN or inf in floating-point weights, naming the first tensor that holds one."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{what}: tensor {key} holds NaN or inf; use an intact file")
