"""Matplotlib figures for reports and TensorBoard: confusion matrices and attention maps.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, no GUI backend), so they are
freed as soon as they are no longer referenced and can be drawn from any thread.
"""

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure, SubFigure


def _numpy(x: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def draw_confusion_matrix(
    ax,
    matrix: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    normalize: bool = True,
    title: str | None = None,
) -> None:
    """Draw a confusion matrix (rows: true class, columns: predicted) into ``ax``. With normalize,
    colours and the first number of each cell are row fractions (per-class recall on the diagonal);
    counts follow."""
    counts = _numpy(matrix)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix must be ({k}, {k}) for {k} class names, got {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True)
    shown = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) if normalize else counts
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(shown.max(), 1))
    ax.figure.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = (1 if normalize else shown.max()) / 2
    for i in range(k):
        for j in range(k):
            text = f"{shown[i, j]:.2f}\n({int(counts[i, j])})" if normalize else f"{int(counts[i, j])}"
            color = "white" if shown[i, j] > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    if title:
        ax.set_title(title)


def confusion_matrix_figure(
    matrix: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    normalize: bool = True,
    title: str | None = None,
) -> Figure:
    """A figure holding one confusion matrix (see ``draw_confusion_matrix``)."""
    k = len(class_names)
    fig = Figure(figsize=(1.2 * k + 2.5, 1.1 * k + 1.8), layout="constrained")
    draw_confusion_matrix(fig.add_subplot(), matrix, class_names, normalize, title)
    return fig


def attention_figure(
    features: torch.Tensor | np.ndarray,
    alpha: torch.Tensor | np.ndarray,
    positions_shape: Sequence[int],
    arch: str,
    probabilities: torch.Tensor | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    fig: Figure | SubFigure | None = None,
) -> Figure | SubFigure:
    """The input features of one utterance with its attention weights laid over input time.

    features: (F, N) valid frames only; alpha: the valid attention weights, (T',) for a 1-D model or
    (T' * F',) time-major for a 2-D one; positions_shape: (T',) or (F', T'). Each position is drawn over
    its equal share of the input (a close approximation of its receptive field's centre). A 2-D map
    is also overlaid on the spectrogram; the lower panel shows the weight per time position (summed
    over frequency for 2-D). With ``fig`` (e.g. a subfigure of a larger figure) the panels are drawn
    into it and it is returned.
    """
    feats = _numpy(features)
    weights = _numpy(alpha)
    if feats.ndim != 2:
        raise ValueError(f"features must be (F, N), got shape {feats.shape}")
    num_features, frames = feats.shape
    if weights.size != int(np.prod(positions_shape)):
        raise ValueError(f"alpha has {weights.size} weights but positions_shape {tuple(positions_shape)}")
    if len(positions_shape) == 2:
        freq, time = positions_shape
        grid = weights.reshape(time, freq).T  # time-major flattening -> (F', T')
        per_time = grid.sum(axis=0)
    elif len(positions_shape) == 1:
        grid, per_time = None, weights
    else:
        raise ValueError(f"positions_shape must be (T',) or (F', T'), got {tuple(positions_shape)}")

    fig = Figure(figsize=(8, 5), layout="constrained") if fig is None else fig
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    extent = (0, frames, 0, num_features)
    top.imshow(feats, origin="lower", aspect="auto", extent=extent, cmap="gray" if grid is not None else "viridis")
    if grid is not None:
        # the colour scale starts at 0 so that near-uniform attention looks uniform
        top.imshow(grid, origin="lower", aspect="auto", extent=extent, cmap="inferno", alpha=0.55, vmin=0)
    top.set_ylabel("feature bin")
    bottom.stairs(per_time, np.linspace(0, frames, len(per_time) + 1), fill=True, alpha=0.7)
    bottom.set_xlim(0, frames)
    bottom.set_ylim(0, max(per_time.max() * 1.1, 1e-6))
    bottom.set_xlabel("input frame")
    bottom.set_ylabel("attention")

    heading = [title or arch]
    if probabilities is not None:
        probs = _numpy(probabilities)
        names = list(class_names) if class_names is not None else [str(k) for k in range(len(probs))]
        best = int(probs.argmax())
        heading.append(f"predicted {names[best]} ({probs[best]:.2f})")
    top.set_title(" - ".join(heading))
    return fig
