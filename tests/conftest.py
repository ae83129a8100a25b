import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GOLDEN = Path(os.environ.get("PERFLOW_GOLDEN", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden():
    """The published scheduler's recorded vectors: (json, tensors). Skips where ../shared/golden is absent."""
    if not (GOLDEN / "perflow_reference.json").is_file():
        pytest.skip(f"golden vectors not found at {GOLDEN} (set PERFLOW_GOLDEN or place ../shared/golden)")
    from safetensors.torch import load_file

    return json.loads((GOLDEN / "perflow_reference.json").read_text()), load_file(
        GOLDEN / "perflow_reference.safetensors"
    )


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory):
    """A folder with a tiny random toy teacher (teacher.safetensors, base 8, 10 classes) and data.npz (64 random
    8x8 uint8 images with labels): toy training runs of a few seconds."""
    import numpy as np
    import torch

    from training.toy_model import ToyUNet, save_toy_model

    d = tmp_path_factory.mktemp("tiny_toy")
    torch.manual_seed(0)
    save_toy_model(d / "teacher.safetensors", ToyUNet(num_classes=10, in_channels=1, base=8))
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", images=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8), labels=rng.integers(0, 10, 64))
    return d
