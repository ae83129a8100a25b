"""The data stream without ComfyUI: bad samples decoded or skipped, buckets, splitting and exact resume."""

import json
import os
from itertools import islice

import datagen
import numpy as np
import pytest
import torch

from training.buckets import cover_and_crop, nearest_bucket, parse_buckets, sdxl_buckets
from training.dataset import DataStream, Skip, StreamConfig, decode_image_record, gather, load_rgb, scan_units

BUCKETS = ((64, 64), (64, 96), (96, 64), (48, 128))


def _record(files: dict) -> dict:
    return {"__key__": "k", **files}


@pytest.mark.parametrize("name", sorted(datagen.bad_samples()))
def test_every_bad_kind_is_decoded_or_skipped_with_its_reason(name):
    files, expect = datagen.bad_samples()[name]
    cfg = StreamConfig(data="x", batch_size=1, resolution=64, max_pixels=10_000_000)
    if expect.startswith("skip:"):
        with pytest.raises(Skip) as e:
            decode_image_record(_record(files), cfg)
        assert e.value.args[0] == expect[5:], e.value.args
    else:
        bucket, sample = decode_image_record(_record(files), cfg)
        assert bucket == (64, 64) and sample["pixels"].shape == (64, 64, 3) and sample["pixels"].dtype == torch.uint8


def _rgb(name: str) -> np.ndarray:
    files = datagen.bad_samples()[name][0]
    return np.asarray(load_rgb(next(v for k, v in files.items() if k in ("jpg", "png"))), dtype=np.int32)


def test_decoded_colours_are_right():
    assert np.abs(_rgb("cmyk") - [255, 0, 0]).max() < 8  # CMYK (0, 100%, 100%, 0) is red
    assert np.abs(_rgb("gray16") - 128).max() <= 1  # 0x8000 of 0xffff: mid grey, not clipped to white
    assert np.abs(_rgb("rgb16") - 64).max() <= 1  # 0x4000 per channel
    assert (_rgb("palette") == 255).all()  # the only colour is the transparent index: composited on white
    alpha = _rgb("alpha")
    assert (alpha[:, :40] == [0, 0, 255]).all() and (alpha[:, 40:] == 255).all()


def test_exif_orientation_is_applied():
    im = _rgb("exif")  # stored 96x64 with the left half white, orientation 6 = rotate 90 degrees clockwise
    assert im.shape == (96, 64, 3)
    assert im[:40].mean() > 200 and im[56:].mean() < 50  # the white half is now on top


def test_size_guard_reads_only_the_header():
    with pytest.raises(Skip) as e:
        load_rgb(datagen.png_claiming_size(30000, 30000))  # 900 MP claimed: refused before any decoding
    assert e.value.args[0] == "too large"


def test_buckets():
    sd = sdxl_buckets(1024)
    assert (1024, 1024) in sd and (768, 1344) in sd and (1344, 768) in sd
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 and max(h / w, w / h) <= 4 for h, w in sd)
    assert parse_buckets("1152x896,1024x1024,1152x896", 1024) == [(1024, 1024), (896, 1152)]  # (h, w), by w/h
    assert parse_buckets("none", 64) is None
    for bad in ("1024", "1020x1024", "0x64", "axb"):
        with pytest.raises(ValueError, match="--buckets"):
            parse_buckets(bad, 1024)
    assert nearest_bucket(sd, 600, 1000) == min(sd, key=lambda b: abs(np.log(b[1] / b[0] * 600 / 1000)))
    (nh, nw), (top, left) = cover_and_crop(600, 1000, (768, 1344))
    assert nh >= 768 and nw >= 1344 and min(nh - 768, nw - 1344) == 0
    assert (top, left) == ((nh - 768) // 2, (nw - 1344) // 2)


def test_buckets_never_mix_and_conditioning_is_the_real_geometry(tmp_path):
    pattern = datagen.write_shards(datagen.samples(60), tmp_path / "shards", per_shard=10)
    cfg = StreamConfig(data=pattern, batch_size=3, resolution=64, buckets=BUCKETS, shuffle_buffer=16)
    for batch in islice(DataStream(cfg), 12):
        b, h, w, _ = batch["pixels"].shape
        assert b == 3 and (h, w) in BUCKETS
        for (oh, ow), crop in zip(batch["size"], batch["crop"], strict=True):
            assert nearest_bucket(BUCKETS, oh, ow) == (h, w)  # the size is the real, unresized one
            assert crop == cover_and_crop(oh, ow, (h, w))[1]


def test_square_resize_without_buckets(tmp_path):
    folder = datagen.write_folder(datagen.samples(12, with_bad=False), tmp_path / "f")
    batch = next(iter(DataStream(StreamConfig(data=str(folder), batch_size=4, resolution=48))))
    assert batch["pixels"].shape == (4, 48, 48, 3)


def _keys(stream, n):
    return [(b["epoch"], tuple(b["key"])) for b in islice(stream, n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_same_batches(tmp_path, workers):
    pattern = datagen.write_shards(datagen.samples(90), tmp_path / "shards", per_shard=9)
    cfg = StreamConfig(data=pattern, batch_size=3, resolution=64, buckets=BUCKETS, workers=workers, shuffle_buffer=8)
    whole = _keys(DataStream(cfg), 40)  # crosses epochs (about 25 usable-batch per epoch)
    assert len({e for e, _ in whole}) >= 2
    for stop in (1, 7, 23):
        first = DataStream(cfg)
        head = _keys(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
        again = DataStream(cfg)
        again.load_state_dict(state)
        assert head + _keys(again, 40 - stop) == whole, stop


def test_resume_refuses_changed_data_settings(tmp_path):
    folder = datagen.write_folder(datagen.samples(12, with_bad=False), tmp_path / "f")
    a = DataStream(StreamConfig(data=str(folder), batch_size=2, resolution=64))
    b = DataStream(StreamConfig(data=str(folder), batch_size=2, resolution=64, seed=1))
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())


def test_every_source_gives_the_same_samples_and_report(tmp_path):
    items = datagen.samples(20)
    bad = {f"bad_{n}": e for n, (_, e) in datagen.bad_samples().items()}
    sources = {
        "shards": datagen.write_shards(items, tmp_path / "shards", per_shard=7),
        "folder": str(datagen.write_folder(items, tmp_path / "folder")),
        "jsonl": str(datagen.write_jsonl(items, tmp_path / "jsonl")),
    }
    for name, data in sources.items():
        cfg = StreamConfig(data=data, batch_size=1, resolution=64, max_pixels=10_000_000, epochs=1)
        stream = DataStream(cfg)
        keys = sorted(os.path.splitext(os.path.basename(k.split(":")[-1]))[0] for b in stream for k in b["key"])
        decoded = sorted(k for k, e in bad.items() if e == "decode")
        # the folder has no .json: a sample captioned by an empty .json simply has no caption there
        assert keys == sorted([f"s{i:05d}" for i in range(20)] + decoded), name
        stream.report.write(tmp_path / f"{name}.json")
        report = json.loads((tmp_path / f"{name}.json").read_text())
        got = {os.path.splitext(os.path.basename(e["key"].split(":")[-1]))[0]: e["kind"] for e in report["samples"]}
        assert got == {k: e[5:] for k, e in bad.items() if e != "decode"}, name
        assert report["skipped"] == len(got) and sum(report["by_kind"].values()) == len(got)


def test_too_few_shards_for_the_workers_is_a_clear_error(tmp_path):
    pattern = datagen.write_shards(datagen.samples(6, with_bad=False), tmp_path / "s", per_shard=6)
    with pytest.raises(ValueError, match="1 shards for 1 process.*2 worker"):
        DataStream(StreamConfig(data=pattern, batch_size=1, resolution=64, workers=2))
    with pytest.raises(FileNotFoundError, match="shards missing"):
        scan_units(str(tmp_path / "s" / "{00000..00003}.tar"))


def _two_process_run(rank: int, world: int, pattern: str, out: str, port: int) -> None:
    import multiprocessing

    import torch.distributed as dist

    multiprocessing.set_start_method("fork", force=True)  # DataLoader workers: fork, as in a launched run on Linux
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = StreamConfig(data=pattern, batch_size=2, resolution=64, rank=rank, world=world, workers=2, shuffle_buffer=8)
    whole = _keys(DataStream(cfg), 30)
    first = DataStream(cfg)
    head = _keys(first, 11)
    states = gather(first.state_dict())  # what rank 0 would save
    again = DataStream(cfg)
    again.load_state_dict(states[rank])
    resumed = head + _keys(again, 19)
    everything = gather(whole)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"runs": everything, "resumed_equal": resumed == whole}, f)
    dist.destroy_process_group()


def test_two_processes_split_each_epoch_and_resume_exactly(tmp_path):
    import socket

    import torch.multiprocessing as mp

    pattern = datagen.write_shards(datagen.samples(40, with_bad=False), tmp_path / "shards", per_shard=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.json"
    mp.spawn(_two_process_run, args=(2, pattern, str(out), port), nprocs=2)
    result = json.loads(out.read_text())
    assert result["resumed_equal"]
    per_epoch: dict = {}
    for run in result["runs"]:
        for epoch, keys in run:
            per_epoch.setdefault(epoch, []).extend(keys)
    # 4 slots x 5 shards x 2 samples, batches of 2: an epoch is 10 batches per process, 30 batches are 3 epochs
    assert sorted(per_epoch) == [0, 1, 2]
    for epoch, keys in per_epoch.items():
        assert len(keys) == len(set(keys)) == 40, f"epoch {epoch}: a sample seen twice or missed"
    assert per_epoch[0] != per_epoch[1]  # reshuffled per epoch


def test_cache_key_changes_with_every_input(tmp_path):
    from training.cache_latents import cache_key

    folder = datagen.write_folder(datagen.samples(4, with_bad=False), tmp_path / "f")
    cfg = StreamConfig(data=str(folder), batch_size=1, resolution=64)
    enc = {"checkpoint_sha256": "a" * 64, "architecture": "sd15", "encoder_version": 1}
    key = cache_key(enc, cfg, scan_units(str(folder)))[0]
    assert cache_key(enc, cfg, scan_units(str(folder)))[0] == key  # stable
    changed = [
        cache_key({**enc, "checkpoint_sha256": "b" * 64}, cfg, scan_units(str(folder))),
        cache_key(enc, StreamConfig(data=str(folder), batch_size=1, resolution=72), scan_units(str(folder))),
        cache_key(
            enc, StreamConfig(data=str(folder), batch_size=1, resolution=64, buckets=BUCKETS), scan_units(str(folder))
        ),
        cache_key(
            enc, StreamConfig(data=str(folder), batch_size=1, resolution=64, caption_key="txt"), scan_units(str(folder))
        ),
    ]
    (folder / "s00001.txt").write_text("another caption")
    changed.append(cache_key(enc, cfg, scan_units(str(folder))))
    assert key not in {k for k, _ in changed} and len({k for k, _ in changed}) == len(changed)


def test_make_shards_packs_a_folder_that_reads_back_the_same(tmp_path):
    from training.make_shards import main

    items = datagen.samples(10)
    folder = datagen.write_folder(items, tmp_path / "f")
    pattern = main(["--data", str(folder), "--out", str(tmp_path / "s"), "--per-shard", "4"])
    assert pattern.endswith("{00000..00005}.tar")  # 10 good + 13 bad kinds = 23 images

    def captions(data):
        cfg = StreamConfig(data=data, batch_size=1, resolution=64, max_pixels=10_000_000, epochs=1, shuffle=False)
        stream = DataStream(cfg)
        return sorted(c for b in stream for c in b["caption"]), stream.report.counts()

    assert captions(pattern) == captions(str(folder))
    with pytest.raises(FileExistsError, match="already holds"):
        main(["--data", str(folder), "--out", str(tmp_path / "s")])


def test_small_data_is_read_without_workers():
    from training.dataset import fit_workers

    cfg = StreamConfig(data="x", batch_size=2, resolution=64, workers=2)
    assert fit_workers(cfg, 3).workers == 0  # two slots could not both form a batch of 2 from 3 samples
    assert fit_workers(cfg, 40) == cfg
