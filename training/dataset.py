"""Training data as a deterministic, resumable stream of same-size batches, from an image folder, a JSONL
manifest or WebDataset tar shards (or, with the same machinery, from a latent cache: training.cache_latents).

Sources (`--data`):
- a folder of images (jpg, jpeg, png, webp, bmp) with same-name .txt captions;
- a .jsonl manifest of {"image": path, "caption": text} lines (paths relative to the manifest's folder);
- WebDataset shards: local .tar paths with brace patterns (`shards/{00000..00099}.tar`), each sample
  `key.jpg|jpeg|png|webp` + `key.txt` or `key.json` (caption under --caption-key, default "caption").
Tar files are read with the webdataset library (tar grouping, brace expansion, shuffle buffer).

Order and splitting. The data is a list of units: one per shard, or one per image for a folder/manifest.
Epoch e permutes the units with a generator seeded by (seed, e); unit j belongs to slot j mod (processes x
workers), slot = rank x workers + worker, so every sample is read by exactly one worker of one process per
epoch. Each slot streams its units' records through a shuffle buffer seeded by (seed, e, slot), decodes them,
and fills one pending list per bucket; a full list is a batch (batches never mix buckets; what is left in the
lists at the end of an epoch is dropped). Slots run epochs back to back forever; the trainer counts steps.
The DataLoader takes batches from its workers in strict rotation, so the batch sequence of a process is fixed
by (data, seed, processes, workers, batch size, buckets).

Exact resume. Every batch carries its slot's position: epoch, the number of shuffled records consumed, and the
positions of the records waiting in the bucket lists. state_dict() keeps the position of each slot's last
batch that the trainer took, plus the process's batch count. A resumed stream replays each slot's epoch over
the raw records (tar reading and the shuffle buffer, no image decoding) up to that position, decodes only the
waiting records, and continues; worker roles are rotated so that the first batch comes from the slot whose
turn it was. The result is the same batch sequence as an uninterrupted run (tests/test_dataset.py).

Bad samples never stop a run: they are decoded correctly where that is meaningful (CMYK, 16-bit and palette
PNGs, alpha composited on WHITE, EXIF orientation applied) or skipped and counted (unreadable or truncated
images, missing or empty captions, images that would need more than --max-upscale, images over --max-pixels,
checked from the header before decoding). SkipReport collects them; the trainer writes it as a JSON file.
"""

import io
import json
import logging
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from training.buckets import cover_and_crop, nearest_bucket

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
DEFAULT_MAX_PIXELS = 80_000_000  # below PIL's own decompression-bomb warning (89.5 MP), checked before decoding


class Skip(Exception):
    """A sample that cannot be used; args: (kind, detail)."""


@dataclass(frozen=True)
class Unit:
    """What one slot reads as a whole: a tar shard, or one image of a folder or manifest (caption None = none)."""

    path: str
    caption: str | None = None
    is_shard: bool = False


def _is_shard_spec(spec: str) -> bool:
    return spec.endswith(".tar") or ("{" in spec and ".tar" in spec)


def scan_units(spec: str) -> list[Unit]:
    """The units of --data: tar shards (brace patterns expanded), a .jsonl manifest's lines or a folder's images."""
    if _is_shard_spec(spec):
        from webdataset.shardlists import expand_urls

        paths = expand_urls(spec)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"--data: {len(missing)} of {len(paths)} shards missing, first {missing[0]}")
        return [Unit(p, is_shard=True) for p in paths]
    data = Path(spec)
    if data.suffix == ".jsonl":
        units = []
        for n, line in enumerate(data.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{data}:{n}: not a JSON object ({e.msg}); one {{'image': ...}} per line") from e
                if not isinstance(rec, dict) or "image" not in rec:
                    raise ValueError(f"{data}:{n}: a manifest line needs an 'image' entry")
                caption = rec.get("caption", rec.get("text"))
                units.append(Unit(str(data.parent / rec["image"]), None if caption is None else str(caption)))
        return units
    if not data.is_dir():
        raise FileNotFoundError(f"--data must be an image folder, a .jsonl manifest or .tar shards; got {data}")
    images = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    units = []
    for p in images:
        txt = p.with_suffix(".txt")
        units.append(Unit(str(p), txt.read_text(errors="replace") if txt.is_file() else None))
    return units


def fingerprint(units: list[Unit]) -> str:
    """A hash of what the data is: every unit's path, size, mtime and caption (a changed caption changes it)."""
    import hashlib

    h = hashlib.sha256()
    for u in units:
        try:
            st = os.stat(u.path)
            stat = (st.st_size, st.st_mtime_ns)
        except OSError:
            stat = None
        h.update(json.dumps([u.path, stat, u.caption, u.is_shard]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- decoding


def _undecodable(e: Exception) -> Skip:
    kind = "truncated image" if "truncated" in str(e).lower() else "unreadable image"
    return Skip(kind, f"{type(e).__name__}: {e}")


def load_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A PIL RGB image from encoded bytes: EXIF orientation applied, 16-bit scaled to 8, alpha over white.
    Raises Skip for images over max_pixels (from the header, before decoding) and undecodable ones."""
    from PIL import Image, ImageOps

    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own limit, met before ours when it is the lower one
        raise Skip("too large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for garbage
        raise _undecodable(e) from None
    if im.width * im.height > max_pixels:
        raise Skip("too large", f"{im.width}x{im.height} > --max-pixels {max_pixels} (decompression-bomb guard)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            im = ImageOps.exif_transpose(im)
    except Image.DecompressionBombWarning as e:
        raise Skip("too large", str(e)) from None
    except Exception as e:  # noqa: BLE001
        raise _undecodable(e) from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit (or 32-bit int) grayscale: scale to 8 bits
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode in ("L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB")


def _caption(record: dict, caption_key: str) -> str:
    """The caption of a raw record: a folder/manifest caption, else the shard's .txt, else .json[caption_key]."""
    if "__path__" in record:
        text = record["__caption__"]
    elif "txt" in record:
        try:
            text = record["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("missing caption", ".txt is not UTF-8") from None
    elif "json" in record:
        try:
            meta = json.loads(record["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Skip("missing caption", ".json is not valid JSON") from None
        text = meta.get(caption_key) if isinstance(meta, dict) else None
        if text is not None and not isinstance(text, str):
            text = str(text)
    else:
        text = None
    if text is None or not text.strip():
        raise Skip("missing caption", f"no .txt and no non-empty '{caption_key}' in .json" if text is None else "empty")
    return text.strip()


def _image_bytes(record: dict) -> bytes:
    if "__path__" in record:
        try:
            return Path(record["__path__"]).read_bytes()
        except OSError as e:
            raise Skip("unreadable image", f"{e.strerror}") from None
    for ext in SHARD_IMAGE_KEYS:
        if ext in record:
            return record[ext]
    raise Skip("unreadable image", "no .jpg/.jpeg/.png/.webp member in the sample")


@dataclass(frozen=True)
class StreamConfig:
    """Everything that fixes a stream's batch sequence (and so must not change across a resume)."""

    data: str
    batch_size: int  # per process
    resolution: int
    buckets: tuple[tuple[int, int], ...] | None = None  # (h, w); None = one square bucket of `resolution`
    seed: int = 0
    rank: int = 0
    world: int = 1
    workers: int = 0
    shuffle_buffer: int = 1000
    caption_key: str = "caption"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_upscale: float = 2.0
    latents: bool = False  # the data is a latent cache (training.cache_latents), not images
    shuffle: bool = True  # False: units and records in order (cache building)
    epochs: int | None = None  # None: forever; a number: finite passes whose partial batches are kept, too

    def resume_fields(self) -> dict:
        """The settings a resume must match."""
        keep = ("data", "batch_size", "resolution", "buckets", "seed", "world", "workers", "shuffle_buffer")
        return {k: getattr(self, k) for k in keep}


def decode_image_record(record: dict, cfg: StreamConfig) -> tuple[tuple[int, int], dict]:
    """(bucket, sample) of a raw image record: pixels uint8 [H, W, 3] at the bucket size, caption, original
    size (h, w) after EXIF rotation and crop (top, left) in the resized image. Raises Skip."""
    from PIL import Image

    caption = _caption(record, cfg.caption_key)
    im = load_rgb(_image_bytes(record), cfg.max_pixels)
    w, h = im.size
    bucket = nearest_bucket(cfg.buckets, h, w) if cfg.buckets else (cfg.resolution, cfg.resolution)
    upscale = max(bucket[0] / h, bucket[1] / w)
    if upscale > cfg.max_upscale:
        raise Skip("too small", f"{w}x{h} needs {upscale:.2f}x upscaling to {bucket[1]}x{bucket[0]} (> --max-upscale)")
    (nh, nw), (top, left) = cover_and_crop(h, w, bucket)
    im = im.resize((nw, nh), Image.BICUBIC).crop((left, top, left + bucket[1], top + bucket[0]))
    pixels = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return bucket, {"key": record["__key__"], "caption": caption, "pixels": pixels, "size": (h, w), "crop": (top, left)}


def decode_latent_record(record: dict, cfg: StreamConfig) -> tuple[tuple[int, ...], dict]:
    """(latent shape, sample) of a cache record (training.cache_latents writes them). Raises Skip."""
    from safetensors.torch import load

    try:
        tensors = load(record["safetensors"])
    except Exception as e:  # noqa: BLE001
        raise Skip("unreadable cache entry", f"{type(e).__name__}: {e}") from None
    caption = record["txt"].decode("utf-8") if "txt" in record else ""
    return tuple(tensors["latent"].shape), {"key": record["__key__"], "caption": caption, **tensors}


def collate(samples: list[dict]) -> dict:
    """One batch: tensors stacked, other fields as lists."""
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


# ------------------------------------------------------------------------------------------ ordering & resume


def epoch_units(units: list[Unit], cfg: StreamConfig, slot: int, epoch: int) -> list[Unit]:
    """The units slot reads in epoch: a (seed, epoch)-seeded permutation, every (processes x workers)-th."""
    order = list(range(len(units)))
    if cfg.shuffle:
        random.Random(f"perflow-units-{cfg.seed}-{epoch}").shuffle(order)
    return [units[i] for i in order[slot :: cfg.world * max(cfg.workers, 1)]]


def _raw_records(units: list[Unit], errors: list) -> Iterator[dict]:
    """Raw records of units in order: tar samples as webdataset groups them (bytes per extension), or
    {"__path__", "__caption__"} for a folder/manifest image (read only when decoded). Shard read errors go to errors."""
    from webdataset.tariterators import tarfile_samples

    def handler(exn: Exception) -> bool:
        errors.append((str(exn.args[-1]) if exn.args else "?", "unreadable shard", f"{type(exn).__name__}: {exn}"))
        return True

    for u in units:
        if u.is_shard:
            for rec in tarfile_samples([{"url": u.path}], handler=handler):
                rec["__key__"] = f"{u.path}:{rec['__key__']}"
                yield rec
        else:
            yield {"__key__": u.path, "__path__": u.path, "__caption__": u.caption}


def epoch_records(units: list[Unit], cfg: StreamConfig, slot: int, epoch: int, errors: list) -> Iterator[dict]:
    """The slot's records of one epoch through webdataset's shuffle buffer, seeded by (seed, epoch, slot)."""
    from webdataset.filters import shuffle

    records = _raw_records(epoch_units(units, cfg, slot, epoch), errors)
    if not cfg.shuffle or cfg.shuffle_buffer <= 1:
        return records
    rng = random.Random(f"perflow-records-{cfg.seed}-{epoch}-{slot}")
    return shuffle(bufsize=cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng)(records)


def slot_batches(units: list[Unit], cfg: StreamConfig, slot: int, start: dict | None) -> Iterator[dict]:
    """Batches of one slot, epoch after epoch, from position `start` (None: the beginning). Each batch dict has
    "_state" (the position after it), "_skips" (skipped samples since the previous batch) and "epoch"."""
    decode = decode_latent_record if cfg.latents else decode_image_record
    epoch = start["epoch"] if start else 0
    skip_to, waiting = (start["next"], set(start["pending"])) if start else (0, set())
    skips: list = []
    while cfg.epochs is None or epoch < cfg.epochs:
        pending: dict = {}
        emitted = 0
        for i, rec in enumerate(epoch_records(units, cfg, slot, epoch, skips)):
            if i < skip_to and i not in waiting:  # consumed before the resume point: not even decoded
                continue
            try:
                bucket, sample = decode(rec, cfg)
            except Skip as s:
                skips.append((rec["__key__"], *s.args))
                continue
            rows = pending.setdefault(bucket, [])
            rows.append((i, sample))
            if i < skip_to or len(rows) < cfg.batch_size:
                continue
            del pending[bucket]
            emitted += 1
            batch = collate([s for _, s in rows])
            waiting_now = sorted(j for rs in pending.values() for j, _ in rs)
            batch.update(epoch=epoch, _state={"epoch": epoch, "next": i + 1, "pending": waiting_now}, _skips=skips)
            skips = []
            yield batch
        if cfg.epochs is not None:  # a finite pass (cache building) keeps every sample: flush the partial batches
            for rows in pending.values():
                yield {**collate([s for _, s in rows]), "epoch": epoch, "_state": None, "_skips": skips}
                skips = []
            if skips:  # skips after the last batch travel with an empty marker
                yield {"epoch": epoch, "_state": None, "_skips": skips, "_empty": True}
                skips = []
        elif emitted == 0 and skip_to == 0:
            raise ValueError(
                f"--data {cfg.data}: worker slot {slot} of {cfg.world * max(cfg.workers, 1)} formed no batch of "
                f"{cfg.batch_size} in a whole epoch: too few usable samples; lower --batch-size or "
                "--data-workers, or add data (see the skip report)"
            )
        epoch, skip_to, waiting = epoch + 1, 0, set()


class SlotStream(torch.utils.data.IterableDataset):
    """The batches of this process: each DataLoader worker streams one slot (its role rotated on resume)."""

    def __init__(self, units: list[Unit], cfg: StreamConfig, states: dict[int, dict], rotation: int):
        super().__init__()
        self.units, self.cfg, self.states, self.rotation = units, cfg, states, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        n = max(self.cfg.workers, 1)
        role = ((info.id if info else 0) + self.rotation) % n
        slot = self.cfg.rank * n + role
        for batch in slot_batches(self.units, self.cfg, slot, self.states.get(role)):
            batch["_role"] = role
            yield batch


class DataStream:
    """This process's batch stream with resume state and skip report; iterate it, save state_dict() with the
    trainer's checkpoint (per process), load_state_dict() before iterating to continue exactly."""

    def __init__(self, cfg: StreamConfig, units: list[Unit] | None = None):
        self.cfg = cfg
        self.units = units if units is not None else scan_units(cfg.data)
        slots = cfg.world * max(cfg.workers, 1)
        if not self.units:
            raise ValueError(f"--data {cfg.data}: no images or shards found")
        if len(self.units) < slots:
            what = "shards" if self.units[0].is_shard else "images"
            raise ValueError(
                f"--data {cfg.data}: {len(self.units)} {what} for {cfg.world} process(es) x {max(cfg.workers, 1)} "
                "worker(s): every worker needs at least one; write more, smaller shards or lower --data-workers"
            )
        self.batches = 0  # batches this process has taken
        self.states: dict[int, dict] = {}  # role -> position after the last batch taken from it
        self.report = SkipReport()

    def state_dict(self) -> dict:
        return {"config": self.cfg.resume_fields(), "batches": self.batches, "states": dict(self.states)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.cfg.resume_fields()
        for k, v in state["config"].items():
            if mine.get(k) != (tuple(map(tuple, v)) if k == "buckets" and v is not None else v):
                raise ValueError(f"--resume: data setting {k} was {v!r}, now {mine.get(k)!r}; they must match")
        self.batches = state["batches"]
        self.states = {int(k): v for k, v in state["states"].items()}

    def __iter__(self) -> Iterator[dict]:
        n = max(self.cfg.workers, 1)
        ds = SlotStream(self.units, self.cfg, self.states, rotation=self.batches % n)
        workers = self.cfg.workers
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers) if workers else ds
        for batch in loader:
            role = batch.pop("_role")
            self.states[role] = batch.pop("_state")
            self.report.add(batch.pop("_skips"))
            if batch.pop("_empty", False):
                continue
            self.batches += 1
            yield batch


@dataclass
class SkipReport:
    """Samples skipped and why; write() makes the report file (JSON: counts per kind, then every entry)."""

    entries: list = field(default_factory=list)

    def add(self, skips: list) -> None:
        """Append (key, kind, detail) entries not listed yet."""
        seen = {tuple(e) for e in self.entries}
        for s in skips:
            if tuple(s) not in seen:
                seen.add(tuple(s))
                self.entries.append(list(s))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, kind, _ in self.entries:
            out[kind] = out.get(kind, 0) + 1
        return dict(sorted(out.items()))

    def write(self, path: Path) -> None:
        entries = [{"key": k, "kind": kind, "detail": d} for k, kind, d in self.entries]
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps({"skipped": len(entries), "by_kind": self.counts(), "samples": entries}, indent=1))
        os.replace(tmp, path)


def gather(obj) -> list:
    """obj of every process, in rank order (torch.distributed all_gather_object; [obj] if not distributed).
    The trainer saves gather(stream.state_dict()) and each process loads entry [rank] on resume; the skip
    report of a run is the union of gather(stream.report.entries)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def add_data_arguments(p) -> None:
    """The data options shared by the trainer and training.cache_latents (besides --data and --resolution)."""
    a = p.add_argument
    a("--buckets", default=None, help="'sdxl' (the ~1 MP set scaled to --resolution), 'none', or WxH,WxH,...")
    a("--caption-key", default="caption", help="caption field of a shard sample's .json")
    a("--data-workers", type=int, default=2, help="DataLoader worker processes per training process")
    a("--shuffle-buffer", type=int, default=1000, help="samples in the shuffle buffer of each worker")
    a("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip larger images (decompression-bomb guard)")
    a("--max-upscale", type=float, default=2.0, help="skip images that need more upscaling to their bucket")


def estimate_samples(units: list[Unit]) -> int:
    """Samples in the data: exact for a folder or manifest; for shards, shards x the samples of the first one."""
    if not units or not units[0].is_shard:
        return len(units)
    import tarfile

    with tarfile.open(units[0].path) as tar:
        keys = {m.name.split("/")[-1].split(".")[0] for m in tar.getmembers() if m.isfile()}
    return len(units) * len(keys)


def fit_workers(cfg: StreamConfig, samples: int) -> StreamConfig:
    """cfg without DataLoader workers when the data is too small to give each worker slot two batches per
    epoch (a slot that forms no batch would stop the run); logged. Deterministic, so a resume makes the same call."""
    slots = cfg.world * max(cfg.workers, 1)
    if cfg.workers and samples < slots * cfg.batch_size * 2:
        logging.getLogger("perflow.train").warning(
            "%d samples are too few for %d data workers per process: reading them in the training process",
            samples,
            cfg.workers,
        )
        return replace(cfg, workers=0)
    return cfg


def stream_config(args, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0) -> StreamConfig:
    """StreamConfig from add_data_arguments' options; bad values end as ValueError naming the option."""
    from training.buckets import parse_buckets

    for name, ok in (
        ("resolution", args.resolution >= 8 and args.resolution % 8 == 0),
        ("data-workers", args.data_workers >= 0),
        ("shuffle-buffer", args.shuffle_buffer >= 1),
        ("max-pixels", args.max_pixels >= 1),
        ("max-upscale", args.max_upscale >= 1.0),
    ):
        if not ok:
            raise ValueError(f"--{name}: invalid value {getattr(args, name.replace('-', '_'))!r}")
    buckets = parse_buckets(args.buckets, args.resolution)
    return StreamConfig(
        data=str(args.data), batch_size=batch_size, resolution=args.resolution,
        buckets=tuple(buckets) if buckets else None, seed=seed, rank=rank, world=world, workers=args.data_workers,
        shuffle_buffer=args.shuffle_buffer, caption_key=args.caption_key, max_pixels=args.max_pixels,
        max_upscale=args.max_upscale,
    )  # fmt: skip
