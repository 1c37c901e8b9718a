"""The evaluation's figures (matplotlib, Agg): line curves, accuracy heatmaps and log-log scaling with fits."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_lines(path: str, curves: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
               title: str, logx: bool = False, ylim: tuple[float, float] | None = None,
               hline: tuple[float, str] | None = None, vline: tuple[float, str] | None = None) -> str:
    """One line per ``label: (x, y)``; optional horizontal / vertical reference lines ``(value, label)``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (x, y) in curves.items():
        ax.plot(x, y, "o-", label=label)
    if hline is not None:
        ax.axhline(hline[0], color="gray", ls="--", label=hline[1])
    if vline is not None:
        ax.axvline(vline[0], color="gray", ls=":", label=vline[1])
    if logx:
        ax.set_xscale("log", base=2)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_heatmap(path: str, values: np.ndarray, *, rows: Sequence, cols: Sequence, xlabel: str, ylabel: str,
                 title: str, cbar: str) -> str:
    """``values [len(rows), len(cols)]`` in [0, 1] as a red-to-green heatmap with each cell's value written in it
    (the MoBA report's needle-in-a-haystack figure: x = context length, y = depth)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(cols) + 2), max(3.5, 0.45 * len(rows) + 1.5)))
    im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar)
    return _save(fig, path)


def fit_exponent(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (the exponent of ``y ~ x^a``); None below 2 points."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = (x > 0) & (y > 0)
    if keep.sum() < 2:
        return None
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def plot_loglog(path: str, curves: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
                title: str) -> str:
    """Log-log curves, each labelled with its fitted exponent (``fit_exponent``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (x, y) in curves.items():
        if not len(x):
            continue
        a = fit_exponent(x, y)
        ax.plot(x, y, "o-", label=label + ("" if a is None else f" (slope {a:.2f})"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)
