"""Turning samples into records: fixed noises and labels, cached reference samples, the classifier's scores."""

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.toy.metrics import features, frechet_distance
from benchmarks.toy.sampling import Sampler, reference_sampler, run_sampler
from perflow_core.delta_format import state_dict_hash


class Evaluator:
    """Scores rows: paired MSE against a reference model's ref_steps samples from the same noise and CFG, Frechet
    distance to those samples (fd_ref) and to real data (fd_real), class accuracy; keeps every record and grid."""

    def __init__(
        self, n: int, ref_steps: int, trend_n: int, kind: str, clf, real: torch.Tensor, cache: Path, seed: int
    ):
        device = next(clf.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((n, *real.shape[1:]), generator=gen).to(device)
        self.labels = (torch.arange(n) % int(clf.head.out_features)).to(device)
        self.ref_steps, self.trend_n, self.kind, self.clf, self.cache = ref_steps, trend_n, kind, clf, cache
        self.real_feats = {"real": features(clf, real.to(device))[0]}
        self.refs: dict = {}
        self.records: list[dict] = []
        self.images: dict[str, torch.Tensor] = {}

    def sample(self, net: nn.Module, sp: Sampler, param: str = "diff_eps", n: int | None = None):
        """(images, wall seconds) of one sampler on the first n (default all) fixed noises."""
        return run_sampler(net, self.noise[:n], self.labels[:n], sp, self.kind, param)

    def reference(self, net: nn.Module, cfg: float) -> tuple[torch.Tensor, np.ndarray, float]:
        """The net's reference samples at cfg, their features and sampling seconds; disk-cached per weights, CFG, N,
        steps and noise, so repeated runs reuse them."""
        h = state_dict_hash({k: v.cpu() for k, v in net.state_dict().items()})[:16]
        noise_key = hashlib.sha256(self.noise.cpu().numpy().tobytes()).hexdigest()[:8]
        key = f"ref_{self.kind}_{h}_cfg{cfg:g}_n{len(self.noise)}_s{self.ref_steps}_{noise_key}"
        if key not in self.refs:
            path = self.cache / f"{key}.pt"
            if path.is_file():
                blob = torch.load(path, map_location=self.noise.device)
                x, secs = blob["x"], blob["seconds"]
            else:
                x, secs = self.sample(net, reference_sampler(self.kind, self.ref_steps, cfg))
                torch.save({"x": x.cpu(), "seconds": secs}, path)
                print(f"  reference {self.ref_steps} steps cfg {cfg:g}: {secs:.1f}s (cached {path.name})")
            self.refs[key] = (x.to(self.noise.device), features(self.clf, x.to(self.noise.device))[0], secs)
        return self.refs[key]

    def row(self, group: str, model: str, net: nn.Module, sp: Sampler, ref_net: nn.Module, **kw) -> dict:
        """Sample, score against ref_net's reference (at sp's CFG or ref_cfg) and real data ('real' or real=name);
        record. kw: param (the net's parameterization), ref_cfg, real."""
        param, ref_cfg, real = kw.get("param", "diff_eps"), kw.get("ref_cfg", sp.cfg), kw.get("real", "real")
        if sp == reference_sampler(self.kind, self.ref_steps, sp.cfg):
            x, _, secs = self.reference(net, sp.cfg)  # a reference (cached): reuse it
        else:
            x, secs = self.sample(net, sp, param)
        ref_x, ref_f, _ = self.reference(ref_net, ref_cfg)
        feats, preds = features(self.clf, x)
        rec = {
            "group": group,
            "model": model,
            "sampler": sp.label(),
            "steps": sp.steps,
            "cfg": sp.cfg_label(),
            "nfe": sp.nfe(),
            "paired_mse": float(((x - ref_x) ** 2).mean()),
            "fd_ref": frechet_distance(feats, ref_f),
            "fd_real": frechet_distance(feats, self.real_feats[real]),
            "acc": float((torch.from_numpy(preds) == self.labels.cpu()).float().mean()),
            "seconds": secs,
        }
        self.records.append(rec)
        self.images[f"{group}_{model}_{rec['sampler']}{sp.steps}_cfg{rec['cfg']}"] = x[:40].cpu()
        print(
            f"  {group:<13} {model:<18} {rec['sampler']:<11} steps {sp.steps:>3} cfg {str(rec['cfg']):<9} "
            f"nfe {rec['nfe']:>3} mse {rec['paired_mse']:.5f} fd_ref {rec['fd_ref']:8.3f} "
            f"fd_real {rec['fd_real']:8.3f} acc {rec['acc']:.3f} {secs:6.1f}s"
        )
        return rec

    @torch.no_grad()
    def trend_point(self, teacher: nn.Module, student: nn.Module, param: str, num_windows: int) -> dict:
        """One training checkpoint: PeRFlow at K steps (CFG 1) on the first trend_n noises, against the teacher's
        reference: paired MSE, its ratio to the teacher's reference solver at K steps (DDIM-K), accuracy."""
        n = self.trend_n
        ref = self.reference(teacher, 1.0)[0][:n]
        key = f"trend_teacher_{num_windows}"
        if key not in self.refs:
            self.refs[key] = self.sample(teacher, reference_sampler(self.kind, num_windows, 1.0), n=n)[0]
        x, _ = self.sample(student, Sampler("perflow", num_windows, 1.0, num_windows=num_windows), param, n)
        mse, base = float(((x - ref) ** 2).mean()), float(((self.refs[key] - ref) ** 2).mean())
        acc = float((features(self.clf, x)[1] == self.labels[:n].cpu().numpy()).mean())
        return {"paired_mse": mse, "teacher_mse": base, "ratio": mse / base, "acc": acc}
