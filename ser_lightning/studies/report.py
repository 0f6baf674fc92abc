"""Cross-validation report: the model and its baselines per fold, mean +- std, paired differences.

With several repeats per fold (``cv --repeats``) a fold's score is the mean over its repeats; the
report gives the standard deviation over folds (of those means) and over seeds (the mean over folds
of the within-fold standard deviation) separately. Baselines are deterministic given the split, so
each fold has one baseline score; the paired difference of UA (model minus baseline) is taken fold
by fold, and a fold is a win when it is positive.
"""
from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

import numpy as np

from ser_lightning.evaluation.baseline import BASELINES
from ser_lightning.evaluation.metrics import METRICS, split_scores
from ser_lightning.outputs import atomic_write_bytes, atomic_write_text
from ser_lightning.run.identity import StudyMismatch, describe, run_differences
from ser_lightning.run.result import RESULT_FILE, RunResult


def collect_results(dirs: list[Path]) -> list[RunResult]:
    """Run results found under ``dirs``, checked to come from one configuration, sorted by (fold, repeat)."""
    results: dict[tuple[int, int], RunResult] = {}
    for folder in dirs:
        for path in sorted(Path(folder).glob(f"fold_*/{RESULT_FILE}")):
            result = RunResult.read(path)
            key = (result.fold, result.repeat)
            if key in results:
                raise ValueError(f"fold {key[0]} repeat {key[1]} appears twice (again in {path})")
            results[key] = result
    if not results:
        raise ValueError(f"no fold results (fold_K/result.json) under {', '.join(map(str, dirs))}")
    runs = [results[key] for key in sorted(results)]
    first = runs[0]
    for result in runs[1:]:
        for key in ("config_key", "num_folds", "class_names"):
            if getattr(result, key) != getattr(first, key):
                raise StudyMismatch(
                    f"fold {result.fold} and fold {first.fold} come from different configurations and cannot "
                    f"be merged into one report ({describe(run_differences(first, result)) or f'{key} differs'})"
                )
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fold_entry(runs: list[RunResult]) -> dict:
    """One fold: the model's metrics averaged over its repeats, their spread, and the baselines."""
    first = runs[0]
    metrics = {name: statistics.fmean(r.metrics[name] for r in runs) for name in METRICS}
    recall = {c: statistics.fmean(r.per_class_recall[c] for r in runs) for c in first.class_names}
    baselines = {name: {"C": b.C, "selection": b.selection, "metrics": b.metrics, "per_class_recall": b.per_class_recall}
                 for name, b in first.baselines.items()}
    return {
        "fold": first.fold,
        "test_speakers": first.test_speakers,
        "shared_speakers": first.shared_speakers,
        "num_test_utterances": first.num_test_utterances,
        "repeats": len(runs),
        "seeds": [r.seed_everything for r in runs],
        "metrics": metrics,
        "seed_std": {name: mean_std([r.metrics[name] for r in runs])[1] for name in METRICS},
        "per_class_recall": recall,
        "min_class_recall": min(min(r.per_class_recall.values()) for r in runs),
        "val_UA": statistics.fmean(r.val_metrics.get("UA", float("nan")) for r in runs),
        "epochs_trained": [r.epochs_trained for r in runs],
        "baselines": baselines,
        "test_utterances": first.test_utterances,
        "wall_seconds": sum(r.wall_seconds for r in runs),
        "head_UA": {name: statistics.fmean(r.head_metrics[name]["UA"] for r in runs)
                    for name in first.head_metrics if all(name in r.head_metrics for r in runs)},
        "calibration": _calibration_entry(runs),
    }


def _calibration_entry(runs: list[RunResult]) -> dict | None:
    """The fold's calibration numbers, averaged over its runs (None for results without them)."""
    if any(r.calibration is None for r in runs):
        return None
    keys = ("temperature", "ece_before", "ece_after", "brier_before", "brier_after")
    entry = {key: statistics.fmean(r.calibration[key] for r in runs) for key in keys}
    entry["selective"] = [
        {"threshold": rows[0]["threshold"], "coverage": statistics.fmean(row["coverage"] for row in rows),
         "accuracy": _nanmean([row["accuracy"] for row in rows])}
        for rows in zip(*(r.calibration["selective"] for r in runs))]
    return entry


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if v == v]
    return statistics.fmean(kept) if kept else float("nan")


def _ensemble_entry(runs: list[RunResult]) -> dict | None:
    """The fold's seed ensemble: the mean of its runs' test probabilities, scored like a single model."""
    if len(runs) < 2 or any(r.test_probabilities is None for r in runs):
        return None
    probabilities = np.mean([np.asarray(r.test_probabilities) for r in runs], axis=0)
    return split_scores(runs[0].test_labels, probabilities.argmax(1), runs[0].class_names).metrics


def summarize(runs: list[RunResult]) -> dict:
    first = runs[0]
    class_names = first.class_names
    by_fold: dict[int, list[RunResult]] = {}
    for result in runs:
        by_fold.setdefault(result.fold, []).append(result)
    folds = [_fold_entry(group) for _, group in sorted(by_fold.items())]
    for fold, (_, group) in zip(folds, sorted(by_fold.items())):
        fold["ensemble_metrics"] = _ensemble_entry(group)
    confusion = np.sum([np.array(r.confusion_matrix) for r in runs], axis=0)
    missing = sorted(set(range(first.num_folds)) - set(by_fold))
    summary = {
        "protocol": first.protocol,
        "speaker_dependent": any(r.speaker_dependent for r in runs),
        "num_folds": first.num_folds,
        "folds_reported": [f["fold"] for f in folds],
        "folds_missing": missing,
        "complete": not missing,
        "repeats": max(f["repeats"] for f in folds),
        "seeds": {"seed_everything": sorted({r.seed_everything for r in runs}),
                  "data_random_seed": first.data_random_seed},
        "class_names": class_names,
        "config": first.config,
        "mean": {}, "std": {}, "std_over_seeds": {},
        "per_class_recall": {},
        "baselines": {},
        "confusion_matrix_sum": confusion.tolist(),
        "confusion_matrix_runs": len(runs),
        "num_test_utterances": sum(f["num_test_utterances"] for f in folds),
        "wall_seconds": sum(f["wall_seconds"] for f in folds),
        "folds": folds,
    }
    for name in METRICS:
        summary["mean"][name], summary["std"][name] = mean_std([f["metrics"][name] for f in folds])
        summary["std_over_seeds"][name] = statistics.fmean(f["seed_std"][name] for f in folds)
    for cls in class_names:
        mean, std = mean_std([f["per_class_recall"][cls] for f in folds])
        summary["per_class_recall"][cls] = {"mean": mean, "std": std}
    for name in folds[0]["baselines"]:
        present = [f for f in folds if name in f["baselines"]]
        entry = {"title": BASELINES[name].title if name in BASELINES else name, "mean": {}, "std": {}}
        for metric in METRICS:
            entry["mean"][metric], entry["std"][metric] = mean_std([f["baselines"][name]["metrics"][metric]
                                                                    for f in present])
        entry["UA_difference"] = _paired([f["metrics"]["UA"] - f["baselines"][name]["metrics"]["UA"] for f in present])
        if all(f["ensemble_metrics"] for f in present):
            entry["ensemble_UA_difference"] = _paired(
                [f["ensemble_metrics"]["UA"] - f["baselines"][name]["metrics"]["UA"] for f in present])
        summary["baselines"][name] = entry
    if all(r.network_weight is not None for r in runs) and folds[0]["head_UA"]:
        summary["network_weights"] = [r.network_weight for r in runs]
    heads = [name for name in folds[0]["head_UA"] if all(name in f["head_UA"] for f in folds)]
    if heads:
        summary["heads"] = {name: dict(zip(("mean", "std"), mean_std([f["head_UA"][name] for f in folds])),
                                       per_fold=[f["head_UA"][name] for f in folds]) for name in heads}
        if "statistics" in heads:
            summary["heads"]["network_contribution"] = _paired(
                [f["metrics"]["UA"] - f["head_UA"]["statistics"] for f in folds])
    if all(f["calibration"] for f in folds):
        calibration = {key: dict(zip(("mean", "std"), mean_std([f["calibration"][key] for f in folds])))
                       for key in ("temperature", "ece_before", "ece_after", "brier_before", "brier_after")}
        calibration["ece_lower_after"] = sum(f["calibration"]["ece_after"] < f["calibration"]["ece_before"]
                                             for f in folds)
        calibration["selective"] = [
            {"threshold": rows[0]["threshold"], "coverage": statistics.fmean(r["coverage"] for r in rows),
             "accuracy": _nanmean([r["accuracy"] for r in rows])}
            for rows in zip(*(f["calibration"]["selective"] for f in folds))]
        summary["calibration"] = calibration
    if summary["baselines"]:
        summary["strongest_baseline"] = max(summary["baselines"], key=lambda n: summary["baselines"][n]["mean"]["UA"])
    if all(f["ensemble_metrics"] for f in folds):
        summary["ensemble"] = {"mean": {}, "std": {}}
        for name in METRICS:
            summary["ensemble"]["mean"][name], summary["ensemble"]["std"][name] = mean_std(
                [f["ensemble_metrics"][name] for f in folds])
    return summary


TIE_TOLERANCE = 1e-6
"""Differences of UA (a fraction) this small are ties: equal scores that float32 rounding set apart."""


def _paired(differences: list[float]) -> dict:
    """Per-fold differences, their mean and std, and the folds where the model is ahead (wins) or level (ties)."""
    mean, std = mean_std(differences)
    return {"per_fold": differences, "mean": mean, "std": std, "wins": sum(d > TIE_TOLERANCE for d in differences),
            "ties": sum(abs(d) <= TIE_TOLERANCE for d in differences), "folds": len(differences)}


def _wins(paired: dict) -> str:
    ties = paired.get("ties", 0)
    return f"wins {paired['wins']} of {paired['folds']} folds" + (f" ({ties} tied)" if ties else "")


def protocol_line(summary: dict) -> str:
    protocol, folds = summary["protocol"], summary["num_folds"]
    if protocol == "random":
        return (f"Protocol: RANDOM split, {folds} folds (SPEAKER-DEPENDENT: test speakers also appear "
                "in training; these numbers overstate performance on new speakers)")
    dependent = [f["fold"] for f in summary["folds"] if f.get("shared_speakers")]
    if dependent:
        return (f"Protocol: {protocol}, {folds} folds; folds {dependent} are SPEAKER-DEPENDENT (a speaker in both "
                "training and test), the others speaker-independent")
    return f"Protocol: {protocol}, {folds} folds (speaker-independent: no speaker in two splits of a fold)"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown(summary: dict) -> str:
    baselines = list(summary["baselines"])
    lines = ["# Cross-validation report", "", protocol_line(summary), ""]
    if not summary["complete"]:
        lines += [f"**INCOMPLETE**: folds {summary['folds_missing']} are missing; means are over "
                  f"{len(summary['folds_reported'])} of {summary['num_folds']} folds.", ""]
    if summary["repeats"] > 1:
        lines += [f"Each fold ran {summary['repeats']} times (seeds {summary['seeds']['seed_everything']}); a fold's "
                  "score is the mean over its runs.", ""]
    head = "| Fold | Test speakers | Utterances | WA % | UA % | macro-F1 % | min class recall % |"
    rule = "|---|---|---|---|---|---|---|"
    for name in baselines:
        head += f" {name} UA % | UA diff |"
        rule += "---|---|"
    lines += [head, rule]
    for fold in summary["folds"]:
        metrics = fold["metrics"]
        speakers = fold["test_speakers"]
        speakers = ", ".join(speakers) if len(speakers) <= 8 else f"{len(speakers)} speakers"
        row = (f"| {fold['fold']} | {speakers} | {fold['num_test_utterances']} | {_pct(metrics['WA'])} | "
               f"{_pct(metrics['UA'])} | {_pct(metrics['F1'])} | {_pct(fold['min_class_recall'])} |")
        for name in baselines:
            other = fold["baselines"].get(name)
            row += (f" {_pct(other['metrics']['UA'])} | {100 * (metrics['UA'] - other['metrics']['UA']):+.1f} |"
                    if other else " - | - |")
        lines.append(row)
    mean, std = summary["mean"], summary["std"]
    row = f"| **mean +- std** | | {summary['num_test_utterances']} | " + " | ".join(
        f"**{_pct(mean[n])} +- {_pct(std[n])}**" for n in METRICS) + " | |"
    for name in baselines:
        baseline = summary["baselines"][name]
        paired = baseline["UA_difference"]
        row += (f" {_pct(baseline['mean']['UA'])} +- {_pct(baseline['std']['UA'])} | "
                f"**{100 * paired['mean']:+.1f} +- {100 * paired['std']:.1f}** |")
    lines.append(row)
    if summary["repeats"] > 1:
        seeds = summary["std_over_seeds"]
        lines += ["", "Standard deviation over seeds (mean over folds of the within-fold std): "
                  + ", ".join(f"{n} {_pct(seeds[n])}" for n in METRICS)
                  + "; over folds (of the fold means): " + ", ".join(f"{n} {_pct(std[n])}" for n in METRICS) + "."]
    if "ensemble" in summary:
        ensemble = summary["ensemble"]
        lines += ["", f"Seed ensemble (per fold, the mean of its {summary['repeats']} runs' test probabilities): "
                  + ", ".join(f"{n} {_pct(ensemble['mean'][n])} +- {_pct(ensemble['std'][n])} %" for n in METRICS)
                  + "; per fold UA: " + ", ".join(_pct(f["ensemble_metrics"]["UA"]) for f in summary["folds"]) + "."]
    if baselines:
        lines += ["", "Baselines, fitted and tested on exactly the same splits (UA diff = model UA minus baseline UA, "
                  "per fold; a win is a positive difference, a tie one below 1e-4 points):", ""]
        for name in baselines:
            baseline = summary["baselines"][name]
            paired = baseline["UA_difference"]
            line = (f"- **{name}** ({baseline['title']}): " + ", ".join(
                f"{n} {_pct(baseline['mean'][n])} +- {_pct(baseline['std'][n])} %" for n in METRICS)
                + f"; the model {_wins(paired)}, UA difference "
                f"{100 * paired['mean']:+.1f} +- {100 * paired['std']:.1f} points")
            if "ensemble_UA_difference" in baseline:
                ensemble = baseline["ensemble_UA_difference"]
                line += (f"; the seed ensemble {_wins(ensemble)}, UA difference "
                         f"{100 * ensemble['mean']:+.1f} +- {100 * ensemble['std']:.1f} points")
            lines.append(line)
    if "strongest_baseline" in summary:
        name = summary["strongest_baseline"]
        paired = summary["baselines"][name]["UA_difference"]
        lines += ["", f"Strongest baseline: **{name}**; against it the model {_wins(paired)} "
                  f"(UA difference {100 * paired['mean']:+.1f} +- {100 * paired['std']:.1f} points)."]
    lines += _heads_lines(summary) + _calibration_lines(summary)
    lines += ["", "Per-class recall % (mean +- std over folds):", "",
              "| " + " | ".join(summary["class_names"]) + " |", "|" + "---|" * len(summary["class_names"]),
              "| " + " | ".join(f"{_pct(r['mean'])} +- {_pct(r['std'])}" for r in summary["per_class_recall"].values())
              + " |", "", f"Confusion matrix summed over {summary['confusion_matrix_runs']} run(s) (rows: true, "
              "columns: predicted):", "",
              "| true \\ predicted | " + " | ".join(summary["class_names"]) + " |",
              "|---|" + "---|" * len(summary["class_names"])]
    for name, row in zip(summary["class_names"], summary["confusion_matrix_sum"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", f"Std is the sample standard deviation over folds. Seeds: {summary['seeds']}. "
              "Checkpoints were chosen by the validation speakers' UA; every test fold was used once per run."]
    return "\n".join(lines) + "\n"


def _heads_lines(summary: dict) -> list[str]:
    """What each part adds: the same trained models scored with one head at a time, and with both."""
    if "heads" not in summary:
        return []
    heads = summary["heads"]
    titles = {"statistics": "statistics head alone", "attention": "attention network alone (its logits only)"}
    lines = ["", "What each part adds (the same trained models, each head's logits alone, then their sum; UA %):", "",
             "| | " + " | ".join(f"fold {f}" for f in summary["folds_reported"]) + " | mean +- std |",
             "|---|" + "---|" * (len(summary["folds_reported"]) + 1)]
    for name in ("statistics", "attention"):
        if name in heads:
            lines.append(f"| {titles[name]} | " + " | ".join(_pct(v) for v in heads[name]["per_fold"])
                         + f" | {_pct(heads[name]['mean'])} +- {_pct(heads[name]['std'])} |")
    lines.append("| both (the model) | " + " | ".join(_pct(f["metrics"]["UA"]) for f in summary["folds"])
                 + f" | {_pct(summary['mean']['UA'])} +- {_pct(summary['std']['UA'])} |")
    if "network_contribution" in heads:
        paired = heads["network_contribution"]
        lines += ["", f"The network's own contribution (both minus the statistics head alone): "
                  f"{100 * paired['mean']:+.1f} +- {100 * paired['std']:.1f} UA points; it helps in "
                  f"{paired['wins']} of {paired['folds']} folds."]
        if "network_weights" in summary:
            lines += ["The network's share of the logits, chosen per run on the validation speakers: "
                      + ", ".join(f"{w:g}" for w in summary["network_weights"]) + "."]
    return lines


def _calibration_lines(summary: dict) -> list[str]:
    if "calibration" not in summary:
        return []
    c = summary["calibration"]

    def cell(key: str, scale: float = 100.0) -> str:
        return f"{scale * c[key]['mean']:.1f} +- {scale * c[key]['std']:.1f}"

    folds = len(summary["folds_reported"])
    lines = ["", "Calibration of the test probabilities (temperature fitted on the validation speakers; ECE over 15 "
             "bins, in %; Brier score x 100):", "",
             "| | ECE % | Brier x 100 |", "|---|---|---|",
             f"| before temperature scaling | {cell('ece_before')} | {cell('brier_before')} |",
             f"| after (T = {c['temperature']['mean']:.2f} +- {c['temperature']['std']:.2f}) | {cell('ece_after')} | "
             f"{cell('brier_after')} |", "",
             f"ECE is lower after scaling in {c['ece_lower_after']} of {folds} folds.", "",
             "Abstention (answer only when the top probability reaches the threshold; after scaling):", "",
             "| threshold | coverage % | accuracy on the answered % |", "|---|---|---|"]
    lines += [f"| {row['threshold']:.2f} | {_pct(row['coverage'])} | "
              + ("-" if row["accuracy"] != row["accuracy"] else _pct(row["accuracy"])) + " |" for row in c["selective"]]
    return lines


def confusion_png(summary: dict) -> bytes:
    from matplotlib.figure import Figure

    from ser_lightning.plotting import draw_confusion_matrix

    matrix = np.array(summary["confusion_matrix_sum"])
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    counts_ax, recall_ax = fig.subplots(1, 2)
    draw_confusion_matrix(counts_ax, matrix, summary["class_names"], normalize=False, title="counts")
    draw_confusion_matrix(recall_ax, matrix, summary["class_names"], normalize=True, title="row-normalised (recall)")
    kind = "speaker-dependent" if summary["speaker_dependent"] else "speaker-independent"
    fig.suptitle(f"Summed over {len(summary['folds_reported'])} folds, {kind}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_report(dirs: list[Path], out: Path) -> dict:
    """Write cv_report.json, cv_report.md and confusion_matrix.png into `out`; return the summary."""
    summary = summarize(collect_results(dirs))
    text = markdown(summary)
    atomic_write_text(out / "cv_report.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "cv_report.md", text)
    atomic_write_bytes(out / "confusion_matrix.png", confusion_png(summary))
    return {**summary, "markdown": text}
