"""The PNG plots of the report (matplotlib, Agg), drawn from the JSON alone."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .analysis import mean_over_runs  # noqa: E402
from .data import CLASSES  # noqa: E402
from .report import plot_path  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def plot_k_over_training(data: Mapping[str, Any], path: Path) -> Path:
    """Mean k (over layers) of the training batches against step, one line per arm."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in data["arms"].values():
        curve = arm["runs"][0]["curve"]
        ax.plot(curve["step"], [sum(k) / len(k) for k in curve["k_by_layer"]],
                label=arm["label"], linestyle="-" if arm["dynamic"] else "--")
    ax.set(xlabel="training step", ylabel="mean experts per token (training batches)",
           title="Mean k over training (first seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_pareto(data: Mapping[str, Any], path: Path) -> Path:
    """Validation bits/byte against expert FLOPs relative to top-2: the first seed filled (every
    arm, paired), further seeds hollow; the static top-1 / top-2 line of the first seed."""
    fig, ax = plt.subplots(figsize=(10.5, 5))
    arms = data["arms"]
    for i, arm in enumerate(arms.values()):
        color = f"C{i % 10}"
        marker = "o" if arm["dynamic"] else "s"
        first, *rest = arm["runs"]
        ax.plot(first["flops_rel_top2"], first["val_bpb"], marker, color=color,
                label=arm["label"])
        for run in rest:
            ax.plot(run["flops_rel_top2"], run["val_bpb"], marker, color=color,
                    markerfacecolor="none")
    if "top1" in arms and "top2" in arms:
        pts = [(arms[n]["runs"][0]["flops_rel_top2"], arms[n]["runs"][0]["val_bpb"])
               for n in ("top1", "top2")]
        ax.plot(*zip(*pts), color="gray", linestyle=":", label="static top-1 / top-2 line")
    ax.set(xlabel="expert FLOPs relative to top-2 (evaluation)",
           ylabel="validation bits per byte",
           title=f"Quality against expert compute (filled: seed {data['meta']['seeds'][0]}; "
                 "hollow: second seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the points
    return _save(fig, path)


def plot_switch(data: Mapping[str, Any], path: Path) -> Path:
    """Switched routings of the trained top-2 model: bits/byte against mean k."""
    fig, ax = plt.subplots(figsize=(8, 5))
    points = data["inference_switch"]["points"]
    for family in dict.fromkeys(p["family"] for p in points):
        pts = sorted((p["k_mean"], p["val_bpb"]) for p in points if p["family"] == family)
        ax.plot(*zip(*pts), marker=".", label=f"top-2 model, {family}")
    for name in ("top1", "top2"):
        if name in data["arms"]:
            runs = data["arms"][name]["runs"]
            ax.plot(mean_over_runs(runs, "k_mean"), mean_over_runs(runs, "val_bpb"), "k*",
                    markersize=12)
            ax.annotate(f"trained {data['arms'][name]['label']}",
                        (mean_over_runs(runs, "k_mean"), mean_over_runs(runs, "val_bpb")),
                        textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set(xlabel="mean experts per token", ylabel="validation bits per byte",
           title="Inference-time switch (no retraining)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_synthetic(data: Mapping[str, Any], path: Path) -> Path:
    """Mean k per token class and synthetic arm, with the bootstrap 95% intervals."""
    arms = data["synthetic"]["arms"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(CLASSES)
    for j, cls in enumerate(CLASSES):
        xs = [i + (j - 1) * width for i in range(len(arms))]
        means = [a["classes"][cls]["k_mean"] for a in arms.values()]
        err = [[m - a["classes"][cls]["k_ci"][0] for m, a in zip(means, arms.values())],
               [a["classes"][cls]["k_ci"][1] - m for m, a in zip(means, arms.values())]]
        ax.bar(xs, means, width, yerr=err, capsize=2, label=cls)
    ax.set_xticks(range(len(arms)), [a["label"] for a in arms.values()], rotation=20,
                  ha="right", fontsize=7)
    ax.set(ylabel="mean experts per token", title="Synthetic task: k by token class")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def make_plots(data: Mapping[str, Any], out: Path) -> list[Path]:
    """Every plot whose data the JSON holds, written into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_k_over_training(data, plot_path(out, "k_over_training")),
               plot_pareto(data, plot_path(out, "pareto"))]
    if data.get("inference_switch"):
        written.append(plot_switch(data, plot_path(out, "switch")))
    if data.get("synthetic", {}).get("arms"):
        written.append(plot_synthetic(data, plot_path(out, "synthetic")))
    return written
