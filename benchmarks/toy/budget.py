"""What a benchmark run costs and trains: the Budget (sizes of every phase), the training recipes, the phases."""

from dataclasses import asdict, dataclass, fields, replace

from benchmarks.toy.sampling import FLOW_SHIFT
from training.reflow import ReflowConfig

PHASES = ("main", "cfg_schedule", "param", "plug_and_play", "cost")
# The phases a teacher kind has: a flow teacher's rows are the main ones (its students train velocity only, and
# per-window CFG, plug-and-play fine-tuning and the cost rows are built for the eps teacher).
PHASES_BY_KIND = {"diffusion": PHASES, "flow": ("main",)}


@dataclass(frozen=True)
class Recipe:
    """One way of training a PeRFlow student; every trained row gets the Budget's iterations."""

    name: str
    num_windows: int = 4
    parameterization: str = "diff_eps"
    timestep_grid: int = 1000
    sampler_point_share: float = 0.75  # the trainer's default (issue 13); 0 = published timepoint sampling
    lr_schedule: str = "cosine"
    time_kind: str = "diffusion"  # the teacher kind it trains on ("flow": windows at sampling.FLOW_SHIFT)

    def reflow_config(self, solver_steps: int) -> ReflowConfig:
        """The trainer's ReflowConfig of this recipe (everything not named here at the trainer's default)."""
        rc = ReflowConfig(
            parameterization=self.parameterization,
            num_windows=self.num_windows,
            solver_steps=solver_steps,
            timestep_grid=self.timestep_grid,
            sampler_point_share=self.sampler_point_share,
            time_kind=self.time_kind,
            flow_shift=FLOW_SHIFT if self.time_kind == "flow" else 1.0,
        )
        rc.validate()
        return rc


# "perflow": the trainer's default timepoints (share 0.75 on the sampler's points, published 1/1000 grid) with the
# cosine learning rate (issue 13's winner); "published": the published script's uniform 1/1000 grid, constant lr;
# "grid8": the previous benchmark's model, timepoints only on the 1/8 grid (not a published-grid model).
RECIPES = {
    r.name: r
    for r in (
        Recipe("perflow"),
        Recipe("perflow-published", sampler_point_share=0.0, lr_schedule="constant"),
        Recipe("perflow-grid8", timestep_grid=8, sampler_point_share=0.0, lr_schedule="constant"),
        Recipe("perflow-velocity", parameterization="velocity"),
        Recipe("perflow-K2", num_windows=2),
    )
}
K4_RECIPES = ("perflow", "perflow-published", "perflow-grid8")  # the K = 4 rows at 4..8 steps
# A flow teacher's students: the trainer's default recipe with the velocity parameterization on flow windows, as
# training.train picks for a flow teacher (reflow_for_teacher), at K = 4 and K = 2.
FLOW_RECIPES = {
    r.name: r
    for r in (
        Recipe("perflow", parameterization="velocity", time_kind="flow"),
        Recipe("perflow-K2", num_windows=2, parameterization="velocity", time_kind="flow"),
    )
}
RECIPES_BY_KIND = {"diffusion": RECIPES, "flow": FLOW_RECIPES}
K4_RECIPES_BY_KIND = {"diffusion": K4_RECIPES, "flow": ("perflow",)}


@dataclass(frozen=True)
class Budget:
    """Sizes of a run; the defaults are the full run (any other value is labelled reduced), sized to finish in
    60 minutes on one core of this project's shared 2-core CPU (~0.35 s CPU per training iteration, ~1.3 ms per
    image and network evaluation there). On a GPU: --n 10000 --iters 3000."""

    n: int = 400  # fixed noises per row
    ref_steps: int = 100  # steps of the reference sampler (the teacher's DDIM)
    iters: int = 600  # training iterations of every trained model
    checkpoints: int = 5  # trend points per trained model (evenly spaced iterations, the last = iters)
    trend_n: int = 250  # noises scored at each trend point
    solver_steps: int = 4  # teacher solver steps per window (S)
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 20
    ema: float = 0.99
    finetune_iters: int = 300  # plug-and-play fine-tune (the teacher trainer's loop)
    classifier_epochs: int = 6
    cost_iters: int = 5
    rss_sizes_mb: tuple[int, ...] = (8, 64, 256)
    phases: tuple[str, ...] = PHASES

    def checkpoint_iters(self) -> tuple[int, ...]:
        """The iterations at which each model is scored during training."""
        return tuple(sorted({max(1, round(self.iters * (i + 1) / self.checkpoints)) for i in range(self.checkpoints)}))

    def reduced(self, available: tuple[str, ...] = PHASES) -> list[str]:
        """What differs from the full run (empty for a full run): knobs as name=value, skipped phases of those
        `available` to the teacher kind (PHASES_BY_KIND)."""
        full = Budget()
        out = [
            f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != getattr(full, f.name)
        ]
        return [x for x in out if not x.startswith("phases=")] + [
            f"{p} skipped" for p in available if p not in self.phases
        ]

    def as_dict(self) -> dict:
        return asdict(self)


QUICK = Budget(
    n=10,
    ref_steps=10,
    iters=6,
    checkpoints=2,
    trend_n=10,
    solver_steps=1,
    batch=8,
    finetune_iters=2,
    classifier_epochs=1,
    cost_iters=1,
    rss_sizes_mb=(1,),
)

KNOBS = (
    "n",
    "ref_steps",
    "iters",
    "checkpoints",
    "trend_n",
    "solver_steps",
    "lr",
    "finetune_iters",
    "classifier_epochs",
)


def budget_from(quick: bool, overrides: dict, phases: tuple[str, ...] | None, kind: str = "diffusion") -> Budget:
    """The full (or quick) budget with the command line's knobs (None = unchanged) and phase selection (default:
    every phase of the teacher kind)."""
    b = replace(QUICK if quick else Budget(), **{k: v for k, v in overrides.items() if v is not None})
    b = replace(b, phases=PHASES_BY_KIND[kind] if phases is None else phases)
    return replace(b, trend_n=min(b.trend_n, b.n))
