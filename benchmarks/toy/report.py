"""A run's outputs: results.json (records, trend, cost, targets, meta), results.md, plots and sample grids."""

import json
from pathlib import Path

from benchmarks.toy.budget import K4_RECIPES_BY_KIND
from training.preview import save_grid

COLS = ["group", "model", "sampler", "steps", "cfg", "nfe", "paired_mse", "fd_ref", "fd_real", "acc", "seconds"]
TREND_COLS = ["recipe", "iteration", "cpu_seconds", "wall_seconds", "paired_mse", "teacher_mse", "ratio", "acc"]


def cell(v) -> str:
    """A table cell: floats with 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def md_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def write_results(out: Path, res: dict) -> None:
    """results.json and results.md."""
    (out / "results.json").write_text(json.dumps(res, indent=1))
    meta = res["meta"]
    title = "REDUCED RUN (" + "; ".join(meta["reduced_by"]) + ")" if meta["reduced"] else "full run"
    lines = [f"# PeRFlow toy benchmark: {title}", "", f"`{meta['command']}`", ""]
    lines += [
        f"Commit {meta['commit']}; {meta['machine']}; {meta['total_wall_seconds'] / 60:.1f} min wall, "
        f"{meta['total_cpu_seconds'] / 60:.1f} min process CPU. Teacher {meta['teacher']} ({meta['teacher_kind']}), "
        f"data {meta['data']}."
    ]
    lines += ["", "Time grid: " + meta["time_grid"], "", "## Rows", ""]
    lines += md_table(COLS, [[r[c] for c in COLS] for r in res["records"]])
    base = reference_name(meta)
    lines += ["", f"## Training trend (PeRFlow at K steps, CFG 1, first trend_n noises; ratio to teacher {base}-K)", ""]
    lines += md_table(TREND_COLS, [[p[c] for c in TREND_COLS] for p in res["trend"]])
    if res["cost"]:
        c = res["cost"]
        lines += ["", "## Cost", ""]
        lines += md_table(list(c["train"][0]), [list(r.values()) for r in c["train"]])
        lines += [
            "",
            f"Network per sampling step (N={c['sampler']['n']}): {c['sampler']['network_ms_per_step']:.1f} ms; ",
        ]
        lines[-1] += "sampler overhead per step: " + ", ".join(
            f"{p} {r['overhead_us_per_step']:.1f} us" for p, r in c["sampler"]["overhead_us_per_step"].items()
        )
        keys = ["file", "file_mib", "read_mib", "peak_rss_mib"]
        lines += [""] + md_table(keys, [[d[k] for k in keys] for d in c["delta_read"]])
    issue = "issue 14 section 3, issue 5" if meta["teacher_kind"] == "flow" else "issue 13 section 3, issue 5"
    lines += ["", f"## Targets ({issue})", ""]
    verdict = {True: "PASS", False: "MISS", None: "SKIP"}
    lines += [f"- {verdict[t['pass']]} {t['target']}: {t['detail']}" for t in res["targets"]]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def reference_name(meta: dict) -> str:
    """The teacher's reference solver as named in the tables: DDIM, or Euler for a flow teacher."""
    return {"ddim": "DDIM", "euler": "Euler"}[meta["reference"].rsplit("-", 1)[0]]


def write_grids(out: Path, images: dict) -> None:
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    for key, x in images.items():
        name = "".join(c if c.isalnum() or c in "-_.," else "_" for c in key).replace(",", "-")
        save_grid(grids / f"{name}.png", x, 10, scale=2)


def write_plots(out: Path, res: dict) -> list[str]:
    """error_vs_time.png (trend per recipe against process CPU seconds) and error_vs_steps.png (paired error at 4..8
    steps, CFG 1 and 2.5, when the main phase ran; a flow teacher: every step count below the reference, against
    network evaluations per guidance pass); returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plots (pip install matplotlib)")
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for recipe in dict.fromkeys(p["recipe"] for p in res["trend"]):
        pts = [(p["cpu_seconds"], p["paired_mse"]) for p in res["trend"] if p["recipe"] == recipe]
        ax.plot(*zip(*pts, strict=True), marker="o", label=recipe)
    for k in sorted({p["teacher_mse"] for p in res["trend"]}):
        ax.axhline(k, color="gray", ls="--", lw=0.8)
    ax.set(yscale="log", xlabel="training time (process CPU s)", ylabel="PeRFlow-K paired MSE (CFG 1)")
    ax.set_title(f"error vs training time; dashed: teacher {reference_name(res['meta'])} at K steps", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "error_vs_time.png", dpi=110)
    plt.close(fig)
    cfgs = sorted({r["cfg"] for r in res["records"] if r["group"] == "main"})
    if not cfgs:  # a run without the main phase has no step-count rows to plot
        return ["error_vs_time.png"]
    fig, axes = plt.subplots(1, len(cfgs), figsize=(6 * len(cfgs), 4.5), squeeze=False)
    kind = res["meta"]["teacher_kind"]
    lines = [(m, "perflow-K4") for m in K4_RECIPES_BY_KIND[kind]]
    names = {"perflow": "PeRFlow, default recipe", "perflow-published": "PeRFlow, published recipe"}
    names |= {"perflow-grid8": "PeRFlow, 1/8-grid model", "ddim": "teacher DDIM", "dpmpp_2m": "teacher DPM++(2M)"}
    if kind == "flow":  # x = evaluations per guidance pass: steps, or Heun's 2 per step but the last
        lines += [("perflow-K2", "perflow-K2"), ("teacher", "euler"), ("teacher", "heun")]
        names |= {"perflow": "PeRFlow K=4", "perflow-K2": "PeRFlow K=2", "euler": "teacher Euler"}
        names |= {"heun": "teacher Heun"}
        ref_steps = res["meta"]["budget"]["ref_steps"]
        x_of, kept = (lambda r: r["nfe"] // (1 if r["cfg"] == 1.0 else 2)), (lambda r: r["steps"] < ref_steps)
    else:
        lines += [("teacher", "ddim"), ("teacher", "dpmpp_2m")]
        x_of, kept = (lambda r: r["steps"]), (lambda r: 4 <= r["steps"] <= 8)
    for ax, cfg in zip(axes[0], cfgs, strict=True):
        for model, sampler in lines:
            pts = sorted(
                (x_of(r), r["paired_mse"])
                for r in res["records"]
                if (r["group"], r["model"], r["sampler"], r["cfg"]) == ("main", model, sampler, cfg) and kept(r)
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    ls="--" if model == "teacher" else "-",
                    label=names.get(model, names.get(sampler)),
                )
        xlabel = "network evaluations per guidance pass (= steps but for Heun)" if kind == "flow" else "sampling steps"
        ax.set(yscale="log", xlabel=xlabel, ylabel="paired MSE to the teacher's reference", title=f"CFG {cfg:g}")
        if kind == "flow":
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "error_vs_steps.png", dpi=110)
    plt.close(fig)
    return ["error_vs_time.png", "error_vs_steps.png"]
