"""CSV manifests for custom data: one row per file with ``path,label,speaker`` and optional columns.

``data.root`` is the CSV file itself. Relative paths are resolved against the manifest's folder,
and every path must lie inside that folder (``..`` that climbs out of it, or an absolute path
elsewhere, is a bad row that is never opened) unless ``allow_outside_root``; links inside the
folder are followed. Labels must be names of the common vocabulary (any case); an optional ``sex``
column takes male/female/m/f (empty = unknown); every other column is kept in ``Utterance.fields``.
Duplicate paths, missing files, unknown labels and empty cells are reported with their line
numbers, all in one error (or, with ``lenient``, the rows are skipped and listed in ``ScanResult.skipped``).
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from .records import (
    EMOTIONS, OUTSIDE_ROOT, Corpus, CorpusError, ScanResult, Skipped, SyntheticFile, SyntheticSpeaker, Utterance,
    listed_path, synthetic_takes, synthetic_voices, within,
)

REQUIRED = ("path", "label", "speaker")
SEXES = {"male": "male", "m": "male", "female": "female", "f": "female", "": None}
MAX_LISTED = 20


def read_rows(manifest: str | Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row with lower-case column names) for each data row; CorpusError if unreadable."""
    manifest = Path(manifest).expanduser()
    if not manifest.is_file():
        raise CorpusError(f"data.root: manifest '{manifest}' is not a file (corpus 'manifest' expects a CSV file)")
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [(name or "").strip().lower() for name in reader.fieldnames or []]
            missing = [name for name in REQUIRED if name not in columns]
            if missing:
                raise CorpusError(
                    f"{manifest}: missing column(s) {missing} in the header line (found {columns}; "
                    f"expected {','.join(REQUIRED)} plus optional columns)"
                )
            reader.fieldnames = columns
            rows = [  # line_num: the (last) line of the row just read
                (reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CorpusError(f"{manifest}: cannot read the manifest ({err})") from err
    return rows


def manifest_labels(manifest: str | Path, *, allow_outside_root: bool = False) -> tuple[str, ...]:
    """The vocabulary labels used in the manifest, in vocabulary order (unknown labels are left out).

    ``allow_outside_root`` is accepted like every corpus's ``read_classes``; labels do not depend on it.
    """
    used = {row["label"].lower() for _, row in read_rows(manifest)}
    return tuple(name for name in EMOTIONS if name in used)


def _parse_row(row: dict[str, str], folder: Path, seen: dict[Path, int]) -> tuple[Utterance | None, list[str]]:
    """An Utterance for one row, or the row's problems."""
    problems = []
    for name in REQUIRED:
        if not row.get(name):
            problems.append(f"empty {name}")
    label, sex = row.get("label", "").lower(), row.get("sex", "").lower()
    if label and label not in EMOTIONS:
        problems.append(f"unknown label '{row['label']}' (valid labels: {', '.join(EMOTIONS)})")
    if sex not in SEXES:
        problems.append(f"sex '{row['sex']}' is not male, female, m, f or empty")
    path = None
    if row.get("path"):
        path = listed_path(row["path"], folder).resolve()
        if path in seen:
            problems.append(f"duplicate path '{row['path']}' (first listed on line {seen[path]})")
        elif not path.is_file():
            problems.append(f"file '{row['path']}' not found (looked for {path})")
    if problems:
        return None, problems
    extra = {k: v for k, v in row.items() if k not in (*REQUIRED, "sex")}
    return Utterance(path, label, row["speaker"], SEXES[sex], "manifest", extra), []


def scan_manifest(
    manifest: str | Path, emotions: Sequence[str], *, lenient: bool = False, allow_outside_root: bool = False
) -> ScanResult:
    """Read the manifest's rows with the wanted emotions; report every bad row with its line number."""
    manifest = Path(manifest).expanduser()
    folder = manifest.resolve().parent
    roots = None if allow_outside_root else (folder, manifest.absolute().parent)
    wanted = set(emotions)
    utterances: list[Utterance] = []
    problems: list[Skipped] = []
    seen: dict[Path, int] = {}
    for line, row in read_rows(manifest):
        where = f"{manifest} line {line}"
        if roots is not None and row.get("path") and not within(listed_path(row["path"], folder), roots):
            problems.append(Skipped(listed_path(row["path"], folder), f"{where}: path '{row['path']}' is outside the "
                                    f"manifest's folder {folder} (set data.allow_outside_root=true to use files "
                                    "elsewhere)", OUTSIDE_ROOT))
            continue
        utterance, row_problems = _parse_row(row, folder, seen)
        if row_problems:
            problems.append(Skipped(folder / row.get("path", ""), f"{where}: {'; '.join(row_problems)}",
                                    "bad manifest row"))
            continue
        seen[utterance.path] = line
        if utterance.emotion in wanted:
            utterances.append(utterance)
    if problems and not lenient:
        listing = "\n  ".join(problem.reason for problem in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise CorpusError(
            f"{manifest}: {len(problems)} bad row(s) (set data.lenient=true to skip them):\n  {listing}{more}"
        )
    if not utterances:
        raise CorpusError(f"{manifest}: no rows with labels {sorted(wanted)}")
    return ScanResult(utterances, problems)


def synthetic_speakers(count: int) -> list[SyntheticSpeaker]:
    """spk01, spk02, ... with alternating sexes."""
    return synthetic_voices([(f"spk{j + 1:02d}", ("male", "female")[j % 2]) for j in range(count)])


def synthetic_files(speaker: SyntheticSpeaker, emotions: Sequence[str]) -> list[SyntheticFile]:
    """``audio/SPEAKER/EMOTION_NNN.wav``."""
    return synthetic_takes(
        speaker, emotions, 5, lambda emotion, take, strong: f"audio/{speaker.id}/{emotion}_{take + 1:03d}.wav"
    )


def write_synthetic_metadata(out_dir: Path, rows: list[tuple[SyntheticFile, SyntheticSpeaker]]) -> None:
    """``manifest.csv`` (path,label,speaker,sex,take) listing every file."""
    lines = ["path,label,speaker,sex,take"]
    lines += [f"{file.relpath},{file.emotion},{speaker.id},{speaker.sex},{file.take + 1}" for file, speaker in rows]
    (out_dir / "manifest.csv").write_text("\n".join(lines) + "\n")


CORPUS = Corpus(
    name="manifest", title="manifest", classes=None, example="manifest.csv with path,label,speaker",
    scan=scan_manifest, synthetic_speakers=synthetic_speakers, synthetic_files=synthetic_files,
    default_speakers=6, max_speakers=99, root_is_file=True, write_synthetic_metadata=write_synthetic_metadata,
    read_classes=manifest_labels, lists_paths=True,
)
