"""PeRFlow (Piecewise Rectified Flow, arXiv 2405.07510) math in pure torch: no ComfyUI import.

"SP" in docstrings cites the published scheduler, src/scheduler_perflow.py of the PeRFlow repository."""

from .delta_keys import WeightFile, read_weight_file
from .safetensors_file import DeltaFileError

__all__ = ["DeltaFileError", "WeightFile", "read_weight_file"]
