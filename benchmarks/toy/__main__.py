"""`python -m benchmarks.toy`: run the benchmark; a user's mistake ends in one `error:` line (exit 2)."""

from benchmarks.toy.cli import main
from training.cli import run

run(main)
