"""Scores of a set of samples: a small classifier trained on the real data (features and accuracy) and the Frechet
distance between Gaussian fits of those features (FID, Heusel et al. 2017, with this classifier's features)."""

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Classifier(nn.Module):
    """Small CNN classifier; its 64-d penultimate activations are the Frechet-distance features."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, 64),
            nn.SiLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int, device: str) -> tuple[nn.Module, float]:
    """Adam on 90% of the real data with light shift augmentation; returns (model, held-out accuracy)."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(images), generator=g)
    split = int(0.9 * len(images))
    tr, te = perm[:split], perm[split:]
    clf = Classifier(int(labels.max()) + 1, images.shape[1]).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(epochs):
        for b in torch.randperm(split, generator=g).split(64):
            x = images[tr[b]].to(device)
            x = torch.roll(x, shifts=tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3))
            loss = F.cross_entropy(clf(x), labels[tr[b]].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(images[te].to(device)).argmax(1).cpu() == labels[te]).float().mean().item()
    return clf, acc


def load_classifier(cache: Path, data_path: Path, images, labels, epochs: int, device: str) -> tuple[nn.Module, float]:
    """The cached classifier for this data file and epoch count, trained once."""
    digest = hashlib.sha256(Path(data_path).read_bytes()).hexdigest()[:16]
    path = cache / f"classifier_{digest}_e{epochs}.pt"
    if path.is_file():
        blob = torch.load(path, map_location=device)
        clf = Classifier(int(labels.max()) + 1, images.shape[1]).to(device)
        clf.load_state_dict(blob["state"])
        return clf.eval(), blob["acc"]
    clf, acc = train_classifier(images, labels, epochs, device)
    torch.save({"state": clf.state_dict(), "acc": acc}, path)
    return clf, acc


@torch.no_grad()
def features(clf: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 [N, 64], predicted classes [N])."""
    feats, preds = [], []
    for b in images.split(1000):
        f = clf.features(b)
        feats.append(f.double().cpu())
        preds.append(clf.head(f).argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) between Gaussian fits (FID, Heusel et al. 2017); the trace of
    the matrix square root via the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric PSD)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross))
