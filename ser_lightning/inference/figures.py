"""The `predict --plot_dir` figure: attention over the input, class probabilities, window probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure, SubFigure

from ser_lightning.inference.recognizer import Prediction
from ser_lightning.plotting import attention_figure


def _probability_bars(fig: Figure | SubFigure, probabilities: dict[str, float], title: str) -> None:
    ax = fig.subplots()
    names, values = list(probabilities), np.array(list(probabilities.values()))
    colors = ["tab:red" if k == values.argmax() else "tab:gray" for k in range(len(values))]
    ax.barh(names, values, color=colors)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.set_title(title)
    for k, value in enumerate(values):
        inside = value > 0.8  # long bars carry their label inside
        ax.text(value - 0.02 if inside else value + 0.02, k, f"{value:.2f}", va="center",
                ha="right" if inside else "left", color="white" if inside else "black")


def _window_curves(fig: SubFigure, prediction: Prediction) -> None:
    ax = fig.subplots()
    centres = np.array([(w.start + w.end) / 2 for w in prediction.windows])
    for name in prediction.probabilities:
        ax.plot(centres, [w.probabilities[name] for w in prediction.windows], marker=".", label=name)
    start, end = prediction.attention_span
    ax.axvspan(start, end, color="tab:red", alpha=0.1, label="window shown above")
    ax.set_xlim(0, prediction.duration)
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s), window centres")
    ax.set_ylabel("probability")
    ax.legend(loc="upper right", fontsize="small", ncol=2)


def prediction_figure(prediction: Prediction, arch: str, min_frames: int = 0) -> Figure:
    """Features with the attention over them, and the class probabilities of one prediction.

    For a recording split into windows the attention panel shows the window kept in the prediction
    (``attention_span``), the bar chart the aggregate (mean over windows) and a lower panel the
    probabilities of every window over time. ``min_frames``: the model's minimum input; shorter
    features are drawn zero-padded to it, as the model saw them.
    """
    if prediction.features is None:
        raise ValueError("the prediction carries no features to plot")
    features = prediction.features
    if features.shape[-1] < min_frames:
        features = np.pad(features, ((0, 0), (0, min_frames - features.shape[-1])))
    shape = prediction.attention_grid or (len(prediction.attention),)
    name = Path(prediction.path).name if prediction.path else "waveform"
    fig = Figure(figsize=(13, 7.5 if prediction.windows else 5), layout="constrained")
    if prediction.windows:
        top, bottom = fig.subfigures(2, 1, height_ratios=(3, 2))
        _window_curves(bottom, prediction)
        start, end = prediction.attention_span
        title = f"{name}: window {start:.1f}-{end:.1f} s"
        bars_title = f"mean of {len(prediction.windows)} windows"
    else:
        top, title, bars_title = fig, name, "probabilities"
    left, right = top.subfigures(1, 2, width_ratios=(2.3, 1))
    attention_figure(features, prediction.attention, shape, arch, title=title, fig=left)
    _probability_bars(right, prediction.probabilities, f"{bars_title}: {prediction.label}")
    return fig
