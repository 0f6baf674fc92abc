"""The measurements in README.md and docs/*.md, rendered from the result files in docs/results/*.json.

Every table in the documentation sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` and is
written by this script from JSON files that the benchmarks (``--json``) and ``cv`` (via ``--add-cv``) produce, so
re-measuring is a command, not a hand edit:

    python benchmarks/tables.py                                   # rewrite every table from docs/results/*.json
    python benchmarks/tables.py --check                           # exit 1 when a table differs from its JSON
    python benchmarks/tables.py --add-cv runs/cv NAME --command "python -m ser_lightning cv ..."
                                                                  # keep a cv study's summary as docs/results/cv_NAME.json
    python benchmarks/bench_serve.py --json docs/results/bench_serve.json    # (and the other benchmarks' --json)
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} +- {100 * spread:.1f}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load(name: str) -> Any:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"tables: {path.relative_to(ROOT)} is missing (it feeds a table; see this script's docstring)")
    return json.loads(path.read_text())


# ----------------------------------------------------------------- cv studies
def cv_summary(folder: Path, command: str) -> dict[str, Any]:
    """The compact record of a cv study kept in docs/results: per fold, the model, its parts and every baseline."""
    report = json.loads((folder / "cv_report.json").read_text())
    folds = []
    for fold in report["folds"]:
        entry = {"fold": fold["fold"], "test_speakers": fold["test_speakers"], "UA": fold["metrics"]["UA"],
                 "WA": fold["metrics"]["WA"], "F1": fold["metrics"]["F1"],
                 "ensemble_UA": (fold.get("ensemble_metrics") or {}).get("UA"),
                 "heads": fold.get("head_UA", {}),
                 "baselines": {name: b["metrics"]["UA"] for name, b in fold["baselines"].items()},
                 "calibration": fold.get("calibration")}
        folds.append(entry)
    return {"command": command, "classes": report["class_names"], "protocol": report["protocol"],
            "repeats": report["repeats"], "seeds": report["seeds"], "wall_seconds": report["wall_seconds"],
            "network_weights": report.get("network_weights"),
            "baseline_titles": {name: b["title"] for name, b in report["baselines"].items()}, "folds": folds}


def strongest(study: dict) -> str:
    names = list(study["baseline_titles"])
    return max(names, key=lambda n: statistics.fmean(f["baselines"][n] for f in study["folds"]))


def paired(study: dict, key: Callable[[dict], float | None], baseline: str) -> tuple[str, str]:
    """Mean +- std of the per-fold difference (points) and the wins, against ``baseline``."""
    diffs = [key(f) - f["baselines"][baseline] for f in study["folds"] if key(f) is not None]
    if not diffs:
        return "-", "-"
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    wins = sum(d > 1e-6 for d in diffs)
    return f"{100 * statistics.fmean(diffs):+.1f} +- {100 * spread:.1f}", f"{wins} of {len(diffs)}"


def results_overview(names: list[str]) -> str:
    """Rows: the model (single runs, seed ensemble, its parts) and each baseline; columns: the studies."""
    studies = {name: load(f"cv_{name}") for name in names}
    headers = ["UA % (5 speaker-independent folds, mean +- std)"] + [STUDY_TITLES.get(n, n) for n in names]
    rows = [["**recommended**, single runs (mean of 3 seeds)"] + [mean_std([f["UA"] for f in s["folds"]])
                                                                 for s in studies.values()],
            ["recommended, 3-seed ensemble"] + [mean_std([f["ensemble_UA"] for f in s["folds"] if f["ensemble_UA"]])
                                                for s in studies.values()],
            ["its statistics head alone"] + [mean_std([f["heads"]["statistics"] for f in s["folds"]
                                                       if "statistics" in f["heads"]]) for s in studies.values()]]
    baselines = list(next(iter(studies.values()))["baseline_titles"])
    for name in baselines:
        rows.append([f"baseline `{name}`"] + [mean_std([f["baselines"][name] for f in s["folds"]])
                                              for s in studies.values()])
    rows.append(["strongest baseline"] + [f"`{strongest(s)}`" for s in studies.values()])
    rows.append(["recommended minus strongest baseline (points; wins)"] + [
        "{} ({})".format(*paired(s, lambda f: f["UA"], strongest(s))) for s in studies.values()])
    rows.append(["3-seed ensemble minus strongest baseline"] + [
        "{} ({})".format(*paired(s, lambda f: f["ensemble_UA"], strongest(s))) for s in studies.values()])
    rows.append(["the network's contribution (model minus its head alone; folds it helps)"] + [
        _contribution(s) for s in studies.values()])
    return table(headers, rows)


def recipes(names: list[str]) -> str:
    """The model against every baseline, the field's other recipes (``--baseline_extra``) included: per study, the
    baseline's UA and the model's paired difference to it with its wins."""
    studies = {name: load(f"cv_{name}") for name in names}
    headers = ["UA % (mean +- std); recommended minus it (points; folds won)"] + [
        STUDY_TITLES.get(n.removesuffix("_recipes"), n) for n in names]
    rows = [["**recommended**, single runs (mean of 3 seeds)"] + [mean_std([f["UA"] for f in s["folds"]])
                                                                 for s in studies.values()]]
    titles = next(iter(studies.values()))["baseline_titles"]
    for name, title in titles.items():
        rows.append([f"`{name}`: {title}"] + [
            "{}; {} ({})".format(mean_std([f["baselines"][name] for f in s["folds"]]),
                                 *paired(s, lambda f: f["UA"], name)) for s in studies.values()])
    return table(headers, rows)


def _contribution(study: dict) -> str:
    diffs = [f["UA"] - f["heads"]["statistics"] for f in study["folds"] if "statistics" in f["heads"]]
    if not diffs:
        return "-"
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{100 * statistics.fmean(diffs):+.1f} +- {100 * spread:.1f} ({sum(d > 1e-6 for d in diffs)} of {len(diffs)})"


def per_fold(name: str) -> str:
    study = load(f"cv_{name}")
    best = strongest(study)
    baselines = list(study["baseline_titles"])
    headers = ["fold", "test speakers", "model UA % (mean of seeds)", "seed ensemble", "statistics head alone",
               *[f"{b}" for b in baselines], f"model minus {best}"]
    rows = []
    for f in study["folds"]:
        rows.append([f["fold"], ", ".join(f["test_speakers"]), pct(f["UA"]), pct(f["ensemble_UA"]),
                     pct(f["heads"].get("statistics")), *[pct(f["baselines"][b]) for b in baselines],
                     f"{100 * (f['UA'] - f['baselines'][best]):+.1f}"])
    return table(headers, rows) + f"\nCommand: `{study['command']}`; {study['wall_seconds'] / 60:.0f} min of runs.\n"


def calibration(names: list[str]) -> str:
    headers = ["study", "ECE % before", "ECE % after", "folds lower after", "Brier x 100 before", "Brier x 100 after",
               "temperature"]
    rows = []
    for name in names:
        folds = [f["calibration"] for f in load(f"cv_{name}")["folds"] if f["calibration"]]
        lower = sum(c["ece_after"] < c["ece_before"] for c in folds)
        rows.append([STUDY_TITLES.get(name, name), mean_std([c["ece_before"] for c in folds]),
                     mean_std([c["ece_after"] for c in folds]), f"{lower} of {len(folds)}",
                     mean_std([c["brier_before"] for c in folds]), mean_std([c["brier_after"] for c in folds]),
                     f"{statistics.fmean(c['temperature'] for c in folds):.2f}"])
    return table(headers, rows)


def abstention(names: list[str]) -> str:
    headers = ["threshold"] + [f"{STUDY_TITLES.get(n, n)}: coverage % / accuracy %" for n in names]
    studies = [[f["calibration"]["selective"] for f in load(f"cv_{n}")["folds"] if f["calibration"]] for n in names]
    rows = []
    for k, threshold in enumerate(row["threshold"] for row in studies[0][0]):
        cells = []
        for folds in studies:
            coverage = statistics.fmean(fold[k]["coverage"] for fold in folds)
            accuracies = [fold[k]["accuracy"] for fold in folds if fold[k]["accuracy"] == fold[k]["accuracy"]]
            cells.append(f"{100 * coverage:.1f} / {pct(statistics.fmean(accuracies)) if accuracies else '-'}")
        rows.append([f"{threshold:.2f}", *cells])
    return table(headers, rows)


def candidates() -> str:
    """How the recommendation was chosen: every candidate on the development corpus."""
    data = load("dev_candidates")
    headers = ["candidate (development corpus, 4 classes; 1 seed unless said)", "corpus generator", "model UA %",
               "statistics head alone", "network's contribution", "strongest baseline UA %"]
    rows = [[c["title"], c.get("generator", 1), mean_std(c["UA"]), mean_std(c["head"]) if c["head"] else "-",
             c["contribution"] or "-", f"{mean_std(c['baseline'])} (`{c['baseline_name']}`)"]
            for c in data["candidates"]]
    return table(headers, rows)


def add_candidate(folder: Path, title: str, command: str, baseline_from: Path | None) -> None:
    sys.path.insert(0, str(ROOT))
    from ser_lightning.data.synth import GENERATOR_VERSION

    study = cv_summary(folder, command)
    reference = cv_summary(baseline_from, "") if baseline_from else study
    best = strongest(reference)
    path = RESULTS / "dev_candidates.json"
    data = json.loads(path.read_text()) if path.exists() else {"candidates": []}
    data["candidates"] = [c for c in data["candidates"] if c["title"] != title] + [{
        "title": title, "generator": GENERATOR_VERSION, "command": command, "UA": [f["UA"] for f in study["folds"]],
        "head": [f["heads"]["statistics"] for f in study["folds"] if "statistics" in f["heads"]],
        "contribution": _contribution(study) if any("statistics" in f["heads"] for f in study["folds"]) else None,
        "baseline_name": best, "baseline": [f["baselines"][best] for f in reference["folds"]]}]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"added {title!r} to {path.relative_to(ROOT)}")


STUDY_TITLES = {"dev4": "development corpus, 4 classes", "dev8": "development corpus, 8 classes",
                "builtin4": "built-in corpus, 4 classes", "builtin8": "built-in corpus, 8 classes"}
STUDY_TITLES |= {f"v1_{name}": f"{title} (generator 1)" for name, title in STUDY_TITLES.items()}


# ----------------------------------------------------------------- serving
def serve_tables(kind: str) -> str:
    data = load("bench_serve")
    env = data["environment"]
    machine = f"{env['device_name']}, {env['cpu_count']} cores, torch {env['torch']}"
    if kind == "summary":
        counts = [r["streams"] for r in next(iter(data["models"].values()))["live"]]
        clients = next(iter(data["models"].values()))["http"]["batching on"][-1]["clients"]
        rows = []
        for model, entry in data["models"].items():
            late = {r["streams"]: r["lateness_ms"]["p95"] for r in entry["live"]}
            on, off = (entry["http"][m][-1]["requests_per_s"] for m in ("batching on", "batching off"))
            rows.append([model, f"{entry['hop']['live_stream_ms']['p95']:.1f}",
                         *[f"{late[n]:.0f}" for n in counts], f"{on:.0f} / {off:.0f}"])
        return (table(["model", "live hop p95 ms", *[f"{n} streams: late p95 ms" for n in counts],
                       f"predict requests/s, {clients} clients, batching on / off"], rows) + f"\nMachine: {machine}.\n")
    if kind == "goals":
        rows = [[g["goal"], "-" if g["value"] is None else f"{g['value']:.2f}", f"{g['comparison']} {g['threshold']:g}",
                 {True: "met", False: "**not met**", None: "not measured"}[g["passed"]]] for g in data["goals"]]
        return table(["goal", "measured", "target", ""], rows) + f"\nMachine: {machine}.\n"
    if kind == "work":
        rows = [[model, f"{e['upload_work']['upload_ms']:.1f}", f"{e['upload_work']['model_ms']:.1f}",
                 f"{100 * e['upload_work']['model_share']:.0f} %"] for model, e in data["models"].items()]
        return (table(["model", "one 3 s upload's work, ms", "of which the model's forward, ms", "share"], rows)
                + f"\nMachine: {machine}; one thread, in process.\n")
    if kind == "hop":
        rows = []
        for model, entry in data["models"].items():
            for name, title in (("incremental_ms", "features incremental"), ("recompute_ms", "each window from raw"),
                                ("live_stream_ms", "live stream: + voice activity, running speaker statistics")):
                v = entry["hop"][name]
                rows.append([model, title, f"{v['p50']:.1f}", f"{v['p95']:.1f}", f"{v['p99']:.1f}"])
        return table(["model", "per 0.5 s hop", "p50 ms", "p95 ms", "p99 ms"], rows) + f"\nMachine: {machine}.\n"
    if kind == "live":
        rows = []
        for model, entry in data["models"].items():
            for r in entry["live"]:
                late = r["lateness_ms"]
                rows.append([model, r["streams"], f"{late['p50']:.0f}", f"{late['p95']:.0f}", f"{late['p99']:.0f}",
                             f"{late['max']:.0f}", r["streams_with_dropped_events"], f"{r['memory_per_stream_mb']:.1f}"])
        return table(["model", "live streams", "late p50 ms", "p95 ms", "p99 ms", "max ms", "streams with dropped events",
                      "MB per stream"], rows) + f"\nMachine: {machine}.\n"
    rows = []
    for model, entry in data["models"].items():
        for mode, runs in entry["http"].items():
            rows += [[model, mode, r["clients"], f"{r['requests_per_s']:.1f}", f"{r['latency_ms']['p95']:.0f}"]
                     for r in runs]
    return table(["model", "", "clients", "requests/s", "p95 ms"], rows) + f"\nMachine: {machine}.\n"


# ----------------------------------------------------------------- the operator, training, prediction
def _machine(env: dict) -> str:
    return (f"{env['device_name']} ({env['device']}), {env['threads']} thread(s), torch {env['torch']}, "
            f"fused CPU path {env.get('cpu_capability') or '-'}; `{env['command']}`")


def attention_table() -> str:
    data = load("bench_attention")
    blocks = []
    for run in data["runs"]:
        contenders = [c for c in run["results"][0]["contenders"] if c != "eager"]
        headers = ["shape (B, L, C, D)", "eager f+b ms"] + [f"{c} x eager" for c in contenders] + ["fused memory x eager"]
        rows = []
        for r in run["results"]:
            eager = r["contenders"]["eager"]
            fused = r["contenders"].get("fused")
            rows.append([f"{r['shape']} ({r['B']}, {r['L']}, {r['C']}, {r['D']})", f"{1000 * eager['forward_backward_s']:.3f}",
                         *[f"{r['contenders'][c]['forward_backward_x_eager']:.2f}" if c in r["contenders"] else "-"
                           for c in contenders],
                         f"{fused['memory_x_eager']:.2f}" if fused and fused.get("memory_x_eager") is not None else "-"])
        blocks.append(table(headers, rows) + f"\n{_machine(run['environment'])}, {run['environment'].get('dtype', '')}.\n")
    return "\n".join(blocks)


def train_table() -> str:
    data = load("bench_train")
    rows = [[r["arch"], r["precision"], f"{r['batch_size']} x {r['features']} x ~{r['frames_mean']:.0f}",
             f"{r['backends']['reference']['utterances_per_s']:.0f}", f"{r['backends']['fused']['utterances_per_s']:.0f}",
             f"{r['throughput_ratio']:.2f}"] for r in data["results"]]
    return (table(["model", "precision", "batch", "reference utt/s", "fused utt/s", "fused x reference"], rows)
            + f"\n{_machine(data['environment'])}.\n")


def predict_table() -> str:
    data = load("bench_predict")
    rows = [[name, f"{m['rtf']:.0f}x", f"{m['files_per_s']:.1f}"] for name, m in data["modes"].items()]
    return (table(["mode", "real-time factor", "files/s"], rows)
            + f"\n{data['files']} files, {data['audio_s']:.0f} s of audio; {_machine(data['environment'])}.\n")


TABLES: dict[str, Callable[[], str]] = {
    "attention": attention_table,
    "train": train_table,
    "predict": predict_table,
    "results-overview": lambda: results_overview(["builtin4", "builtin8", "dev4", "dev8"]),
    "results-overview-v1": lambda: results_overview(["v1_builtin4", "v1_builtin8", "v1_dev4", "v1_dev8"]),
    "results-recipes": lambda: recipes(["builtin4_recipes", "builtin8_recipes", "dev4_recipes", "dev8_recipes"]),
    "results-builtin4": lambda: per_fold("builtin4"),
    "results-builtin8": lambda: per_fold("builtin8"),
    "results-dev4": lambda: per_fold("dev4"),
    "results-dev8": lambda: per_fold("dev8"),
    "calibration": lambda: calibration(["builtin4", "builtin8", "dev4", "dev8"]),
    "calibration-v1": lambda: calibration(["v1_builtin4", "v1_builtin8", "v1_dev4", "v1_dev8"]),
    "abstention": lambda: abstention(["builtin4", "builtin8"]),
    "candidates": candidates,
    "serve-hop": lambda: serve_tables("hop"),
    "serve-summary": lambda: serve_tables("summary"),
    "serve-live": lambda: serve_tables("live"),
    "serve-http": lambda: serve_tables("http"),
    "serve-goals": lambda: serve_tables("goals"),
    "serve-work": lambda: serve_tables("work"),
}


def render(text: str, path: Path) -> str:
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"tables: {path.relative_to(ROOT)} names an unknown table {name!r}")
        return match.group(1) + TABLES[name]() + match.group(4)

    return MARKER.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a table differs from what its JSON gives")
    parser.add_argument("--add-cv", nargs=2, metavar=("FOLDER", "NAME"), help="keep a cv study's summary")
    parser.add_argument("--command", default="", help="the command that made the --add-cv/--add-candidate study")
    parser.add_argument("--add-candidate", nargs=2, metavar=("FOLDER", "TITLE"),
                        help="append a candidate's cv study (development corpus) to docs/results/dev_candidates.json")
    parser.add_argument("--baseline-from", type=Path, help="with --add-candidate: a study of the same folds whose "
                                                           "baselines to compare with (when the candidate ran fewer)")
    args = parser.parse_args(argv)
    if args.add_cv:
        folder, name = args.add_cv
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"cv_{name}.json").write_text(json.dumps(cv_summary(Path(folder), args.command), indent=1) + "\n")
        print(f"wrote docs/results/cv_{name}.json")
        return 0
    if args.add_candidate:
        add_candidate(Path(args.add_candidate[0]), args.add_candidate[1], args.command, args.baseline_from)
        return 0
    stale = []
    for path in DOCUMENTS:
        text = path.read_text()
        new = render(text, path)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("tables differ from their JSON in: " + ", ".join(map(str, stale)) + " (run python benchmarks/tables.py)")
        return 1
    print(("rewrote " + ", ".join(map(str, stale))) if stale else "every table matches its JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
