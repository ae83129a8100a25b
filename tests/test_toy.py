"""Toy backend: data loader validation, the UNet, safetensors round trip, DDIM and the committed teacher."""

from pathlib import Path

import numpy as np
import pytest
import torch

from perflow_core.schedule import sd_alphas_cumprod
from training.preview import save_grid
from training.solvers import ddim_times, guided_eps, ode_solve
from training.toy_data import DEFAULT_DATA, load_toy_data
from training.toy_model import ToyUNet, load_toy_model, save_toy_model, toy_model_metadata

TEACHER = Path(__file__).resolve().parents[1] / "training" / "teacher" / "toy_teacher.safetensors"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and multi-thread barriers stall badly on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_npz(path: Path, **arrays) -> Path:
    """Save arrays to path and return it."""
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 8, 8), np.float32), "labels": np.zeros(4, np.int64)}, "uint8"),
        ({"images": np.zeros((4, 64), np.uint8), "labels": np.zeros(4, np.int64)}, "N x H x W"),
        ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, np.float32)}, "integers"),
        ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, np.int64)}, "match images"),
        ({"images": np.zeros((4, 8, 8), np.uint8), "labels": -np.ones(4, np.int64)}, "non-negative"),
        ({"images": np.zeros((4, 8, 8), np.uint8)}, "missing"),
    ],
)
def test_data_rejects_bad_npz(tmp_path, arrays, message):
    with pytest.raises(ValueError, match=message):
        load_toy_data(write_npz(tmp_path / "bad.npz", **arrays))


def test_data_scales_and_adds_channel(tmp_path):
    images = np.array([[[0, 255], [0, 255]]], np.uint8)
    x, y = load_toy_data(write_npz(tmp_path / "ok.npz", images=images, labels=np.array([3], np.int32)))
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0 and y.tolist() == [3]


def test_bundled_data():
    x, y = load_toy_data(DEFAULT_DATA)
    assert x.shape == (5000, 1, 16, 16) and torch.bincount(y).tolist() == [500] * 10


def test_model_size_and_shape():
    model = ToyUNet()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    out = model(torch.randn(3, 1, 16, 16), torch.tensor([1000.0, 512.5, 1.0]), torch.tensor([0, 9, 10]))
    assert out.shape == (3, 1, 16, 16)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ToyUNet(base=8).eval()
    save_toy_model(tmp_path / "m.safetensors", model, {"steps": 7, "note": "hi"})
    loaded = load_toy_model(tmp_path / "m.safetensors")
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 900.0]), torch.tensor([1, 10])
    assert torch.equal(model(x, t, y), loaded(x, t, y))
    meta = toy_model_metadata(tmp_path / "m.safetensors")
    assert meta["steps"] == "7" and meta["note"] == "hi" and loaded.config == model.config


def ddim_sample(model, noise, labels, steps, cfg=1.0):
    """The toy model's DDIM samples at guidance cfg (null class = num_classes)."""
    null = torch.full_like(labels, model.num_classes)

    def eps(x, t):
        tt = torch.full((len(x),), t)
        return guided_eps(lambda xx, s, c: model(xx, s * 1000, c), x, tt, labels, null, cfg)

    return ode_solve(eps, noise, steps)


def test_ddim_times():
    assert ddim_times(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert ddim_times(50, "leading")[[0, -2, -1]].tolist() == pytest.approx([0.982, 0.002, 0.0])
    assert ddim_times(4, "normal").tolist() == pytest.approx([1.0, 0.667, 0.334, 0.001, 0.0])


def test_ddim_one_step_is_x0_prediction():
    torch.manual_seed(0)
    model = ToyUNet(base=8).eval()
    noise, labels = torch.randn(2, 1, 16, 16), torch.tensor([2, 5])
    a = sd_alphas_cumprod()[999]
    with torch.no_grad():
        eps = model(noise, torch.full((2,), 1000.0), labels)
    x0 = (noise - (1 - a).sqrt() * eps) / a.sqrt()
    assert torch.allclose(ddim_sample(model, noise, labels, steps=1), x0, rtol=1e-5, atol=1e-4)


def test_ddim_cfg_combines_conditional_and_unconditional():
    torch.manual_seed(0)
    model = ToyUNet(base=8).eval()
    noise, labels = torch.randn(2, 1, 16, 16), torch.tensor([2, 5])
    a = sd_alphas_cumprod()[999]
    with torch.no_grad():
        t = torch.full((2,), 1000.0)
        eps_c, eps_u = model(noise, t, labels), model(noise, t, torch.full((2,), 10))
    x0 = (noise - (1 - a).sqrt() * (eps_u + 3.0 * (eps_c - eps_u))) / a.sqrt()
    assert torch.allclose(ddim_sample(model, noise, labels, steps=1, cfg=3.0), x0, rtol=1e-5, atol=1e-4)


def test_save_grid(tmp_path):
    from PIL import Image

    save_grid(tmp_path / "g.png", torch.zeros(5, 1, 4, 4), nrow=3, pad=1, scale=2)
    assert Image.open(tmp_path / "g.png").size == (2 * (3 * 5 + 1), 2 * (2 * 5 + 1))


def test_committed_teacher_loads():
    assert TEACHER.stat().st_size < 4 * 2**20
    model = load_toy_model(TEACHER)
    assert model.num_classes == 10 and "final_loss" in toy_model_metadata(TEACHER)
    with torch.no_grad():
        assert torch.isfinite(
            model(torch.randn(2, 1, 16, 16), torch.tensor([500.0, 20.0]), torch.tensor([3, 10]))
        ).all()
