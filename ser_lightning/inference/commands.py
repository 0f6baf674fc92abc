"""The `predict` and `export` commands of `python -m ser_lightning`.

`python -m ser_lightning predict --ckpt_path CKPT PATH [PATH ...]` classifies audio files (``--ckpt_path``
given several times: a seed ensemble, their probabilities averaged); PATHs are
files, folders (searched recursively for every format the decoder reads: WAV, FLAC, OGG/Opus, MP3,
AIFF, CAF, ...) or glob patterns. It prints a table, writes ``--output results.csv`` or
``results.json``, and with ``--plot_dir DIR`` one PNG per file (features with the attention over
them, class probabilities, and the window probabilities over time for long recordings). A file that
cannot be used gets an error row and the others go on; the exit status is 1 when any file failed.
Folders are searched through links (a link back to a folder above is a loop, reported once); files
in folders that are not used (non-audio, AppleDouble ``._*`` and other hidden files, dangling links,
loops, duplicates, unreadable files with the system's reason) are counted by reason in the summary
and listed below it, never skipped silently.

A model trained with ``normalization: speaker`` normalises each recording with the statistics of its
speaker's recordings: ``--speaker_groups folder`` (default) treats every folder's files as one
speaker, ``file`` treats each file as its own speaker (weaker: its own emotion shifts its statistics).

CSV columns, one ``window=all`` row per file plus one row per window of a long recording:

- ``path``: the file; ``status``: ``ok`` or ``error``; ``error``: the reason when status is error;
- ``note``: warnings (e.g. a clip shorter than the model's receptive field was zero-padded);
- ``duration_s``: duration of the recording in seconds;
- ``window``: ``all`` for the utterance-level row, else the window index 0, 1, ...;
- ``start_s`` / ``end_s``: the span the row covers (0 and the duration for ``all``);
- ``emotion``: the predicted emotion (``uncertain`` when its probability is below ``--min_confidence``);
  ``p_<class>``: the probability of each class (calibrated with the checkpoint's temperature; for ``all`` the mean
  of the window probabilities of the windows with speech when the recording was split into windows).

JSON: a list with one object per file: ``path``, ``status``, ``error``, ``note``, ``duration_s``,
``emotion``, ``probabilities`` ({class: p}), ``windows`` (a list of {``start_s``, ``end_s``, ``speech``,
``emotion``, ``probabilities``}) and ``plot`` (the PNG written, or null).

`python -m ser_lightning export --ckpt_path CKPT --format onnx OUT.onnx`: see ``ser_lightning.inference.export``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ser_lightning.data.records import Skipped, unused_summary, walk_folder
from ser_lightning.errors import CommandParser
from ser_lightning.inference.recognizer import EmotionRecognizer, Prediction
from ser_lightning.outputs import atomic_open, check_writable, check_writable_file


@dataclass
class FileResult:
    """The outcome for one input path: a prediction, or the reason it failed."""

    path: str
    prediction: Prediction | None = None
    error: str = ""
    plot: str | None = None

    @property
    def ok(self) -> bool:
        return self.prediction is not None and not self.error


def expand_paths(
    paths: Iterable[str], ignored: list[str] | None = None, unused: list[Skipped] | None = None
) -> list[tuple[str, str | None]]:
    """Files from PATH arguments as (path, problem) pairs; problem says why a PATH gave no file (else None).

    Files named explicitly are tried whatever their extension; folders are searched with
    ``walk_folder``: their non-audio files are appended to ``ignored`` and the files they hold that
    cannot be used (hidden, dangling links, loops, ...) to ``unused`` (when given).
    """
    found: list[tuple[str, str | None]] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        if str(path) not in seen:
            seen.add(str(path))
            found.append((str(path), None))

    for arg in paths:
        path = Path(arg)
        if path.exists():
            matches = [path]
        else:
            matches = [Path(p) for p in sorted(glob.glob(arg, recursive=True))]
            if not matches:
                found.append((arg, "no such file, folder or matching pattern"))
                continue
        for match in matches:
            if match.is_dir():
                try:
                    listing = walk_folder(match)
                except OSError as error:
                    found.append((str(match), f"cannot read the folder ({error.strerror or error})"))
                    continue
                files = listing.audio
                if ignored is not None:
                    ignored += [str(p) for p in listing.other]
                if unused is not None:
                    unused += listing.unused
                if not files:
                    found.append((str(match), "the folder contains no audio files"))
                for file in files:
                    add(file)
            else:
                add(match)
    return found


def _error_text(error: Exception, path: str) -> str:
    """The exception message, naming the file exactly once."""
    text = str(error) or type(error).__name__
    return text if path in text else f"{path}: {text}"


def speaker_groups(paths: Sequence[tuple[str, str | None]], mode: str) -> dict[str, str]:
    """File -> speaker group: its folder (``folder``) or itself (``file``)."""
    return {path: (str(Path(path).parent) if mode == "folder" else path) for path, problem in paths if problem is None}


def group_statistics(recognizer: EmotionRecognizer, groups: dict[str, str]) -> dict[str, Any]:
    """Per speaker group, its (2, F) statistics, or the error that prevented them (a string)."""
    members: dict[str, list[str]] = {}
    for path, group in groups.items():
        members.setdefault(group, []).append(path)
    statistics: dict[str, Any] = {}
    for group, files in members.items():
        usable = []
        for file in files:  # a file that cannot be read is left out of its group's statistics (and fails itself)
            try:
                recognizer.speaker_statistics([file])
                usable.append(file)
            except Exception:  # noqa: BLE001 - the file's own prediction reports the reason
                continue
        try:
            statistics[group] = recognizer.speaker_statistics(usable)
        except Exception as error:  # noqa: BLE001
            statistics[group] = f"no usable recording of this speaker group ({group}) for its statistics: {error}"
    return statistics


def predict_paths(
    recognizer: EmotionRecognizer, paths: Sequence[tuple[str, str | None]], plot_dir: Path | None = None,
    groups: str = "folder",
) -> list[FileResult]:
    """Predict every file; any failure becomes that file's error and the others go on."""
    from tqdm import tqdm

    results = []
    plot_names: set[str] = set()
    group_of = speaker_groups(paths, groups) if recognizer.needs_speaker_stats else {}
    statistics = group_statistics(recognizer, group_of) if group_of else {}
    bar = tqdm(paths, desc="predict", unit="file", file=sys.stderr, disable=len(paths) <= 1)
    for path, problem in bar:
        stats = statistics.get(group_of.get(path))
        if problem is None and isinstance(stats, str):
            problem = stats
        if problem is not None:
            results.append(FileResult(path, error=f"{path}: {problem}"))
            continue
        try:
            result = FileResult(path, recognizer.predict_file(path, stats))
        except Exception as error:  # one bad file never stops the others
            results.append(FileResult(path, error=_error_text(error, path)))
            continue
        if plot_dir is not None:
            try:
                result.plot = str(_write_plot(recognizer, result.prediction, plot_dir, plot_names))
            except Exception as error:
                result.error = f"{path}: plot failed ({type(error).__name__}: {error})"
        results.append(result)
    return results


def _write_plot(recognizer: EmotionRecognizer, prediction: Prediction, plot_dir: Path, used: set[str]) -> Path:
    from ser_lightning.inference.figures import prediction_figure

    stem = Path(prediction.path or "waveform").stem
    name, k = f"{stem}.png", 1
    while name in used:
        k += 1
        name = f"{stem}_{k}.png"
    used.add(name)
    plot_dir.mkdir(parents=True, exist_ok=True)
    out = plot_dir / name
    prediction_figure(prediction, recognizer.arch, recognizer.module.model.min_input_frames).savefig(out, dpi=100)
    return out


# ----------------------------------------------------------------- output
def csv_columns(class_names: Sequence[str]) -> list[str]:
    return ["path", "status", "error", "note", "duration_s", "window", "start_s", "end_s", "emotion",
            *(f"p_{name}" for name in class_names)]


def csv_rows(results: Sequence[FileResult], class_names: Sequence[str]) -> list[dict[str, str]]:
    """The documented CSV rows (module docstring) as dicts keyed by column."""
    rows = []
    for result in results:
        p = result.prediction
        status = "ok" if result.ok else "error"
        base = {"path": result.path, "status": status, "error": result.error, "note": p.note if p else ""}
        if p is None:
            rows.append({**base, "window": "all"})
            continue
        duration = f"{p.duration:.3f}"
        spans = [("all", 0.0, p.duration, p.label, p.probabilities)]
        spans += [(str(i), w.start, w.end, w.label, w.probabilities) for i, w in enumerate(p.windows)]
        for window, start, end, label, probs in spans:
            rows.append({**base, "duration_s": duration, "window": window, "start_s": f"{start:.3f}",
                         "end_s": f"{end:.3f}", "emotion": label,
                         **{f"p_{name}": f"{probs[name]:.6f}" for name in class_names}})
    return rows


def json_records(results: Sequence[FileResult]) -> list[dict]:
    """The documented JSON objects, one per file."""
    records = []
    for result in results:
        p = result.prediction
        records.append({
            "path": result.path,
            "status": "ok" if result.ok else "error",
            "error": result.error or None,
            "note": p.note if p else "",
            "duration_s": p.duration if p else None,
            "emotion": p.label if p else None,
            "probabilities": p.probabilities if p else None,
            "windows": [{"start_s": w.start, "end_s": w.end, "speech": w.speech, "emotion": w.label,
                         "probabilities": w.probabilities} for w in p.windows] if p else [],
            "plot": result.plot,
        })
    return records


def write_results(results: Sequence[FileResult], output: Path, class_names: Sequence[str]) -> None:
    """Write the results as CSV or JSON (by the suffix), atomically: a failure leaves the old file or none."""
    if output.suffix.lower() == ".json":
        with atomic_open(output, "w") as handle:
            handle.write(json.dumps(json_records(results), indent=2) + "\n")
        return
    with atomic_open(output, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(class_names), restval="")
        writer.writeheader()
        writer.writerows(csv_rows(results, class_names))


def format_table(results: Sequence[FileResult]) -> str:
    """A fixed-width table: path, emotion, top probability, duration, status."""
    lines = [("path", "emotion", "p", "duration", "status")]
    for r in results:
        p = r.prediction
        if p is None:
            lines.append((r.path, "-", "-", "-", f"error: {r.error}"))
            continue
        status = ("ok" if r.ok else f"error: {r.error}") + (f" ({len(p.windows)} windows)" if p.windows else "")
        status += f"; {p.note}" if p.note else ""
        lines.append((r.path, p.label, f"{max(p.probabilities.values()):.2f}", f"{p.duration:.2f} s", status))
    widths = [max(len(row[i]) for row in lines) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in lines)


# ----------------------------------------------------------------- commands
def _add_checkpoint_options(parser: argparse.ArgumentParser, *, ensemble: bool = False) -> None:
    if ensemble:
        parser.add_argument("--ckpt_path", required=True, type=Path, action="append",
                            help="checkpoint written by `python -m ser_lightning fit`; given several times (e.g. the "
                                 "seeds of `cv --repeats`), one seed ensemble: their probabilities averaged")
    else:
        parser.add_argument("--ckpt_path", required=True, type=Path,
                            help="checkpoint written by `python -m ser_lightning fit`")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="load a checkpoint that needs more than the safe loader allows (only files you trust)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def predict_main(argv: list[str]) -> None:
    """Predict the emotion of audio files with a trained checkpoint."""
    parser = CommandParser(
        prog="python -m ser_lightning predict", description=predict_main.__doc__,
        epilog="Lightning's own predict over the datamodule's test split: `python -m ser_lightning predict-split`.",
    )
    _add_checkpoint_options(parser, ensemble=True)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="audio files, folders (recursive) or glob patterns")
    parser.add_argument("--output", type=Path, help="write results to a .csv or .json file")
    parser.add_argument("--plot_dir", type=Path, help="write one attention/probability PNG per file here")
    parser.add_argument("--window_seconds", type=float, default=4.0,
                        help="recordings longer than this are split into windows (default 4)")
    parser.add_argument("--hop_seconds", type=float, help="step between windows (default: half a window, 2)")
    parser.add_argument("--batch_size", type=int, default=16, help="windows classified at once (default 16)")
    parser.add_argument("--speaker_groups", choices=("folder", "file"), default="folder",
                        help="for models with speaker normalisation: the files of one folder are one speaker "
                             "(default), or every file is its own")
    parser.add_argument("--min_confidence", type=float,
                        help="below this top probability (after the checkpoint's calibration) the emotion is "
                             "'uncertain'; the probabilities are still written")
    args = parser.parse_args(argv)
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        parser.error(f"--min_confidence: expected a probability in [0, 1], got {args.min_confidence}")
    if args.output is not None:
        if args.output.suffix.lower() not in (".csv", ".json"):
            parser.error(f"--output: expected a .csv or .json file name, got {args.output}")
        check_writable_file(args.output, "--output")
    if args.plot_dir is not None:
        check_writable(args.plot_dir, "--plot_dir")
    recognizer = EmotionRecognizer.from_checkpoint(
        args.ckpt_path, device=args.device, window_seconds=args.window_seconds,
        hop_seconds=args.hop_seconds, batch_size=args.batch_size, trusted=args.trust_checkpoint,
        min_confidence=args.min_confidence,
    )
    ignored: list[str] = []
    unused: list[Skipped] = []
    results = predict_paths(recognizer, expand_paths(args.paths, ignored, unused), args.plot_dir, args.speaker_groups)
    print(format_table(results))
    if args.output is not None:
        write_results(results, args.output, recognizer.class_names)
        print(f"results written to {args.output}")
    failed = sum(not r.ok for r in results)
    summary = f"{len(results)} files: {len(results) - failed} predicted, {failed} failed"
    if ignored:
        kinds = Counter(Path(p).suffix.lower() or "(no extension)" for p in ignored)
        summary += f"; {len(ignored)} non-audio file(s) in folders skipped (" + ", ".join(
            f"{ext} x{count}" for ext, count in sorted(kinds.items())) + ")"
    if unused:
        kinds = Counter(entry.kind for entry in unused)
        summary += f"; {len(unused)} other file(s) in folders not used (" + ", ".join(
            f"{kind} x{count}" for kind, count in sorted(kinds.items())) + ")"
    if recognizer.needs_speaker_stats:
        summary += f"; speaker statistics per {args.speaker_groups}"
    print(summary)
    if unused:
        print("\n".join(["not used, by reason:", *(f"  {line}" for line in unused_summary(unused))]))
    if failed:
        raise SystemExit(1)


def export_main(argv: list[str]) -> None:
    """Export a trained checkpoint's model to ONNX and check it against PyTorch with onnxruntime."""
    from ser_lightning.inference.export import export_onnx

    parser = CommandParser(prog="python -m ser_lightning export", description=export_main.__doc__)
    _add_checkpoint_options(parser)
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="export format (only onnx)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="maximum allowed |onnxruntime - PyTorch| difference (default 1e-4)")
    parser.add_argument("output", type=Path, metavar="OUT.onnx")
    args = parser.parse_args(argv)
    check_writable_file(args.output, "OUT.onnx")
    recognizer = EmotionRecognizer.from_checkpoint(args.ckpt_path, device=args.device, trusted=args.trust_checkpoint)
    print(export_onnx(recognizer.module, args.output, feature=recognizer.feature, tolerance=args.tolerance))
