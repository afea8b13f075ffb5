"""The top-down (BEV) picture of one answer: layout points, camera position, sigma, heading."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from loc3r.fileio import atomic_path
from loc3r.runtime.result import Answer


def plot_bev(answer: Answer, path: str | Path, size_px: int = 800) -> Path:
    """Render ``answer`` to a PNG at ``path`` (written atomically); returns the path.

    Vision-token BEV points are coloured by frame; the predicted position is a dot with a
    circle of radius sigma; the orientation is an arrow (theta from the +x axis, counter-
    clockwise). Models with random or untrained weights get a watermark saying so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    pose = answer.pose
    dpi = 100
    fig, ax = plt.subplots(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    if answer.bev_points is not None:
        points = answer.bev_points
        frames = np.repeat(np.arange(points.shape[0]), points.shape[1])
        scatter = ax.scatter(points[..., 0].ravel(), points[..., 1].ravel(), c=frames, s=4, cmap="viridis", alpha=0.6)
        fig.colorbar(scatter, ax=ax, label="frame")
    label = f"sigma = {pose.sigma:.2f} m"
    if pose.confidence:  # from the bundle's calibration
        label += f", P(error <= 1 m) = {pose.confidence['within_1.0m']:.2f}"
    ax.add_patch(Circle((pose.x, pose.y), pose.sigma, fill=True, alpha=0.15, color="tab:red", label=label))
    ax.plot([pose.x], [pose.y], "o", color="tab:red", markersize=8, label="camera")
    arrow = max(pose.sigma, 0.5)
    ax.annotate(
        "",
        xy=(pose.x + arrow * math.cos(pose.theta_rad), pose.y + arrow * math.sin(pose.theta_rad)),
        xytext=(pose.x, pose.y),
        arrowprops={"arrowstyle": "-|>", "color": "tab:red", "lw": 2.5},
    )
    fit_view(ax, answer, arrow)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{answer.question}\nheading {pose.theta_deg:+.0f} deg", fontsize=10)
    if answer.model.warning:
        fig.text(0.5, 0.5, "RANDOM WEIGHTS" if answer.model.random_weights else "UNTRAINED HEADS",
                 ha="center", va="center", rotation=30, fontsize=48, color="grey", alpha=0.25)
        fig.text(0.5, 0.01, answer.model.warning, ha="center", fontsize=8, color="dimgrey")
    return save_figure_atomic(fig, Path(path))


def fit_view(ax, answer: Answer, arrow: float) -> None:  # noqa: ANN001 - matplotlib Axes
    """Show the layout points, the sigma circle and the arrow."""
    pose = answer.pose
    xs = [pose.x - pose.sigma, pose.x + pose.sigma, pose.x + arrow * math.cos(pose.theta_rad)]
    ys = [pose.y - pose.sigma, pose.y + pose.sigma, pose.y + arrow * math.sin(pose.theta_rad)]
    if answer.bev_points is not None:
        xs += [float(answer.bev_points[..., 0].min()), float(answer.bev_points[..., 0].max())]
        ys += [float(answer.bev_points[..., 1].min()), float(answer.bev_points[..., 1].max())]
    pad = 0.1 * max(max(xs) - min(xs), max(ys) - min(ys), 1.0)
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)


def save_figure_atomic(fig, path: Path) -> Path:  # noqa: ANN001 - matplotlib Figure
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
