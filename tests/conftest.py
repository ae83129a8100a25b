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
