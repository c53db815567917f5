"""Figures of a run, drawn with matplotlib's object API (no pyplot state) in a background thread, so the training
loop never waits for them. `PlotWriter.close()` waits for every queued figure."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from gliograde import GRADES
from gliograde.evaluation.metrics import METRICS

# legend text in points: report.html shows a figure at about half its pixel width, where 8 pt was unreadable
LEGEND_FONTSIZE = 11


def readable_legend(target: Figure | Axes, **kw) -> Figure | Axes:
    """(Re)draw the legend of an Axes, or of each labelled Axes of a Figure, at LEGEND_FONTSIZE; returns target."""
    for ax in target.axes if isinstance(target, Figure) else [target]:
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=LEGEND_FONTSIZE, **kw)
    return target


def save_figure(fig: Figure, path: Path, dpi: int = 100, tight: bool = True) -> None:
    """Render with Agg and write atomically (a temporary file renamed into place)."""
    FigureCanvasAgg(fig)
    if tight:
        fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    tmp.replace(path)


def loss_curve(history: list[dict], path: Path, loss_name: str) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    drw = [h["epoch"] for h in history if h.get("drw_active")]
    if drw:
        ax.axvline(drw[0], color="grey", ls="--", label="DRW on")
    ax.set(xlabel="epoch", ylabel=f"{loss_name} loss", title=f"{loss_name} loss")
    readable_legend(ax)
    save_figure(fig, path)


def learning_curves(history: list[dict], path: Path, loss_name: str) -> None:
    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2)
    e = [h["epoch"] for h in history]
    axes[0, 0].plot(e, [h["train_loss"] for h in history], label="train")
    axes[0, 0].plot(e, [h["val_loss"] for h in history], label="validation")
    axes[0, 0].set(title=f"{loss_name} loss", xlabel="epoch")
    panels = {"validation": axes[0, 1], "per class": axes[1, 0]}  # the metrics' own panels (evaluation/metrics.py)
    for spec in METRICS.values():
        if spec.panel in panels:
            panels[spec.panel].plot(e, [h.get(f"val_{spec.name}", np.nan) for h in history],
                                    label=spec.plot_label or spec.name)  # fmt: skip
    if any("ema_val_auc" in h for h in history):
        axes[0, 1].plot(e, [h.get("ema_val_auc", np.nan) for h in history], "--", label="auc (EMA)")
    axes[0, 1].set(title="validation", xlabel="epoch", ylim=(0, 1.02))
    axes[1, 0].set(title="validation per class", xlabel="epoch", ylim=(0, 1.02))
    axes[1, 1].plot(e, [h["lr_backbone"] for h in history], label="backbone")
    axes[1, 1].plot(e, [h["lr_head"] for h in history], label="classifier")
    axes[1, 1].set(title="learning rate (end of epoch)", xlabel="epoch")
    readable_legend(fig)
    save_figure(fig, path)


def confusion(cm, path: Path, title: str, classes=GRADES) -> None:
    cm = np.asarray(cm)
    fig = Figure(figsize=(4.5, 4))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black"
            )
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    save_figure(fig, path)


def roc(labels, probs, path: Path, title: str, auc: float, positive: str = "HGG") -> None:
    fig = Figure(figsize=(4.5, 4))
    ax = fig.add_subplot()
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, label=f"AUC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="1 - specificity", ylabel=f"sensitivity ({positive})", title=title)
    readable_legend(ax, loc="lower right")
    save_figure(fig, path)


def pr(labels, probs, path: Path, title: str, positive: str = "HGG") -> None:
    fig = Figure(figsize=(4.5, 4))
    ax = fig.add_subplot()
    if len(np.unique(labels)) == 2:
        precision, recall, _ = precision_recall_curve(labels, probs)
        ax.plot(recall, precision)
        ax.axhline(np.mean(labels), color="grey", ls=":", label=f"prevalence of {positive}")
    ax.set(xlabel=f"recall ({positive})", ylabel=f"precision ({positive})", title=title, ylim=(0, 1.02))
    readable_legend(ax, loc="lower left")
    save_figure(fig, path)


class PlotWriter:
    """Queues the five figures of an epoch (or the final ones) on one background thread."""

    def __init__(self, folder: Path, loss_name: str):
        self.folder, self.loss_name = Path(folder), loss_name
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plots")
        self.pending: list[Future] = []

    def submit(self, history: list[dict], labels, probs, metrics: dict, suffix: str, title: str) -> None:
        history = [dict(h) for h in history]  # a snapshot: the loop goes on appending
        labels, probs = np.array(labels), np.array(probs)
        self.pending.append(self.pool.submit(self._draw, history, labels, probs, metrics, suffix, title))

    def _draw(self, history, labels, probs, metrics, suffix, title):
        f = self.folder
        classes = tuple(metrics.get("per_class") or GRADES)  # the names of labels 0 and 1, in order
        loss_curve(history, f / f"loss_curve{suffix}.png", self.loss_name)
        learning_curves(history, f / f"learning_curves{suffix}.png", self.loss_name)
        confusion(metrics["confusion_matrix"], f / f"confusion_matrix{suffix}.png", title, classes)
        roc(labels, probs, f / f"roc_curve{suffix}.png", title, metrics["auc"], classes[1])
        pr(labels, probs, f / f"pr_curve{suffix}.png", title, classes[1])

    def close(self) -> None:
        """Wait for every figure; a figure that failed is logged, never fatal to the run."""
        for fut in self.pending:
            try:
                fut.result()
            except Exception as e:  # a plot must not lose a finished training run
                logging.getLogger("gliograde").warning("a plot could not be drawn: %s", e)
        self.pending.clear()
        self.pool.shutdown(wait=True)
