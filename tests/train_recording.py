"""`python -m training.train` that also records which samples each process trains on, for the multi-process data
tests (tests/test_train_data_comfy.py launch it with accelerate): <out>/keys-<rank>.jsonl gets one line per batch
the trainer takes from its data stream, {"epoch": e, "keys": [...]}."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from training import dataset
from training.cli import run
from training.train import main


def recording(iterate, out: Path):
    def __iter__(self):
        for batch in iterate(self):
            rank = dist.get_rank() if dist.is_initialized() else 0
            with open(out / f"keys-{rank}.jsonl", "a") as f:
                f.write(json.dumps({"epoch": batch["epoch"], "keys": batch["key"]}) + "\n")
            yield batch

    return __iter__


if __name__ == "__main__":
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    dataset.DataStream.__iter__ = recording(dataset.DataStream.__iter__, out)
    run(main)
