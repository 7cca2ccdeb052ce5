"""Matplotlib without a display, and one way to write a figure (PNG, 120 dpi, parent folders created, closed)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def forget_retain_axes(ax, title: str, chance: float = 0.25) -> None:
    """The frame of a forget-vs-retain (Pareto) plot: chance line, axis labels, title, legend."""
    ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("retain accuracy (higher is better)")
    ax.set_ylabel("forget accuracy (lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write and close ``fig``; returns the path written."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


__all__ = ["forget_retain_axes", "pyplot", "save_figure"]
