"""Pack an image folder or a JSONL manifest into WebDataset tar shards for --data (images copied as they are,
captions as .txt; nothing is decoded, so bad images travel along and are skipped at training time).

    python -m training.make_shards --data photos/ --out shards/ --per-shard 1000
    # prints the --data pattern: shards/{00000..00041}.tar
"""

import hashlib
from pathlib import Path

from training.dataset import scan_units


def make_shards(data: str, out: Path, per_shard: int) -> str:
    """Write out/00000.tar, ... in file order; returns their brace pattern. Refuses to write into a folder that
    already holds .tar files."""
    from tqdm import tqdm
    from webdataset import TarWriter

    units = scan_units(data)
    if not units or units[0].is_shard:
        raise ValueError(f"--data {data}: give an image folder or a .jsonl manifest with images")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise FileExistsError(f"--out {out} already holds .tar files: pick an empty folder")
    shards = (len(units) + per_shard - 1) // per_shard
    for s in tqdm(range(shards), desc="shards", unit="shard"):
        with TarWriter(str(out / f"{s:05d}.tar")) as tar:
            for u in units[s * per_shard : (s + 1) * per_shard]:
                path = Path(u.path)
                sample = {"__key__": hashlib.sha1(u.path.encode()).hexdigest()[:16] + "_" + path.stem.replace(".", "_")}
                sample[path.suffix.lower().lstrip(".").replace("jpeg", "jpg")] = path.read_bytes()
                if u.caption is not None:
                    sample["txt"] = u.caption
                tar.write(sample)
    return str(out / f"{{00000..{shards - 1:05d}}}.tar")


def main(argv: list[str] | None = None) -> str:
    from training.cli import ArgumentParser

    p = ArgumentParser(prog="python -m training.make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder (with same-name .txt captions) or .jsonl manifest")
    p.add_argument("--out", type=Path, required=True, help="an empty or new folder for the shards")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    args = p.parse_args(argv)
    if args.per_shard < 1:
        raise ValueError(f"--per-shard must be >= 1; got {args.per_shard}")
    pattern = make_shards(args.data, args.out, args.per_shard)
    print(pattern)
    return pattern


if __name__ == "__main__":
    from training.cli import run

    run(main)
