"""Cross-validation report: per-fold metrics, mean +- std, summed confusion matrix."""

import io
import json
import os
import statistics
import uuid
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ser_lightning.plotting import draw_confusion_matrix

METRICS = ("WA", "UA", "F1")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def collect_fold_results(dirs: list[Path]) -> list[dict]:
    """Fold results found under `dirs`, checked to come from one configuration, sorted by fold."""
    results = {}
    for folder in dirs:
        for path in sorted(Path(folder).glob("fold_*/result.json")):
            result = json.loads(path.read_text())
            if result["fold"] in results:
                raise ValueError(f"fold {result['fold']} appears twice (again in {path})")
            results[result["fold"]] = result
    if not results:
        raise ValueError(f"no fold results (fold_K/result.json) under {', '.join(map(str, dirs))}")
    folds = [results[k] for k in sorted(results)]
    first = folds[0]
    for result in folds[1:]:
        for key in ("config_key", "num_folds", "class_names"):
            if result[key] != first[key]:
                raise ValueError(
                    f"fold {result['fold']} and fold {first['fold']} differ in {key}: they come from different "
                    "configurations and cannot be merged into one report"
                )
    return folds


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(folds: list[dict]) -> dict:
    first = folds[0]
    class_names = first["class_names"]
    confusion = np.sum([np.array(f["confusion_matrix"]) for f in folds], axis=0)
    missing = sorted(set(range(first["num_folds"])) - {f["fold"] for f in folds})
    summary = {
        "protocol": first["protocol"],
        "speaker_dependent": first["speaker_dependent"],
        "num_folds": first["num_folds"],
        "folds_reported": [f["fold"] for f in folds],
        "folds_missing": missing,
        "complete": not missing,
        "seeds": {"seed_everything": first["seed_everything"], "data_seed": first["data_seed"]},
        "class_names": class_names,
        "config": first["config"],
        "mean": {},
        "std": {},
        "per_class_recall": {},
        "confusion_matrix_sum": confusion.tolist(),
        "num_test_utterances": int(confusion.sum()),
        "wall_seconds": sum(f["wall_seconds"] for f in folds),
        "folds": [{k: v for k, v in f.items() if k != "config"} for f in folds],
    }
    for name in METRICS:
        summary["mean"][name], summary["std"][name] = mean_std([f["metrics"][name] for f in folds])
    for cls in class_names:
        mean, std = mean_std([f["per_class_recall"][cls] for f in folds])
        summary["per_class_recall"][cls] = {"mean": mean, "std": std}
    return summary


def protocol_line(summary: dict) -> str:
    if summary["speaker_dependent"]:
        return (f"Protocol: RANDOM split, {summary['num_folds']} folds (SPEAKER-DEPENDENT: test speakers also appear "
                "in training; these numbers overstate performance on new speakers)")
    return f"Protocol: speaker-independent, {summary['num_folds']} folds (no speaker in two splits of a fold)"


def markdown(summary: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = ["# Cross-validation report", "", protocol_line(summary), ""]
    if not summary["complete"]:
        lines += [f"**INCOMPLETE**: folds {summary['folds_missing']} are missing; means are over "
                  f"{len(summary['folds_reported'])} of {summary['num_folds']} folds.", ""]
    lines += ["| Fold | Test speakers | Test utterances | WA % | UA % | macro-F1 % |", "|---|---|---|---|---|---|"]
    for f in summary["folds"]:
        m = f["metrics"]
        speakers = ", ".join(f["test_speakers"]) if len(f["test_speakers"]) <= 8 else f"{len(f['test_speakers'])} speakers"
        lines.append(f"| {f['fold']} | {speakers} | {f['num_test_utterances']} | {pct(m['WA'])} | {pct(m['UA'])} | {pct(m['F1'])} |")
    mean, std = summary["mean"], summary["std"]
    lines.append(f"| **mean +- std** | | {summary['num_test_utterances']} | "
                 + " | ".join(f"**{pct(mean[n])} +- {pct(std[n])}**" for n in METRICS) + " |")
    lines += ["", "Per-class recall % (mean +- std over folds):", "",
              "| " + " | ".join(summary["class_names"]) + " |", "|" + "---|" * len(summary["class_names"]),
              "| " + " | ".join(f"{pct(r['mean'])} +- {pct(r['std'])}" for r in summary["per_class_recall"].values()) + " |",
              "", "Confusion matrix summed over folds (rows: true, columns: predicted):", "",
              "| true \\ predicted | " + " | ".join(summary["class_names"]) + " |",
              "|---|" + "---|" * len(summary["class_names"])]
    for name, row in zip(summary["class_names"], summary["confusion_matrix_sum"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", f"Std is the sample standard deviation over folds. Seeds: {summary['seeds']}."]
    return "\n".join(lines) + "\n"


def confusion_png(summary: dict) -> bytes:
    matrix = np.array(summary["confusion_matrix_sum"])
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    counts_ax, recall_ax = fig.subplots(1, 2)
    draw_confusion_matrix(counts_ax, matrix, summary["class_names"], normalize=False, title="counts")
    draw_confusion_matrix(recall_ax, matrix, summary["class_names"], normalize=True, title="row-normalised (recall)")
    kind = "speaker-dependent (random)" if summary["speaker_dependent"] else "speaker-independent"
    fig.suptitle(f"Summed over {len(summary['folds_reported'])} folds, {kind}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_report(dirs: list[Path], out: Path) -> dict:
    """Write cv_report.json, cv_report.md and confusion_matrix.png into `out`; return the summary."""
    summary = summarize(collect_fold_results(dirs))
    text = markdown(summary)
    atomic_write_text(out / "cv_report.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "cv_report.md", text)
    atomic_write_bytes(out / "confusion_matrix.png", confusion_png(summary))
    return {**summary, "markdown": text}
