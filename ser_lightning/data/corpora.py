"""Registry of corpora: each name maps to a scanner ``(root, emotions, lenient) -> ScanResult`` and its classes.

| corpus   | root                     | classes (common vocabulary)                                   |
|----------|--------------------------|---------------------------------------------------------------|
| ravdess  | folder                   | all eight                                                     |
| cremad   | folder                   | neutral happy sad angry fearful disgust                       |
| tess     | folder                   | neutral happy sad angry fearful disgust surprised (2 speakers)|
| savee    | folder                   | neutral happy sad angry fearful disgust surprised             |
| emodb    | folder                   | neutral happy sad angry fearful disgust (boredom skipped)     |
| manifest | CSV file                 | the vocabulary labels used in the file                        |
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import cremad, emodb, savee, tess
from .manifest import manifest_labels, scan_manifest
from .ravdess import scan_ravdess
from .records import EMOTIONS, ScanResult

Scanner = Callable[..., ScanResult]


@dataclass(frozen=True)
class CorpusInfo:
    """How to scan a corpus and which classes of the common vocabulary it has."""

    title: str
    scan: Scanner
    classes: tuple[str, ...] | None  # None: read from the data (manifest)
    root_is_file: bool = False


CORPORA: dict[str, CorpusInfo] = {
    "ravdess": CorpusInfo("RAVDESS", scan_ravdess, EMOTIONS),
    "cremad": CorpusInfo("CREMA-D", cremad.scan_cremad, cremad.CLASSES),
    "tess": CorpusInfo("TESS", tess.scan_tess, tess.CLASSES),
    "savee": CorpusInfo("SAVEE", savee.scan_savee, savee.CLASSES),
    "emodb": CorpusInfo("EmoDB", emodb.scan_emodb, emodb.CLASSES),
    "manifest": CorpusInfo("manifest", scan_manifest, None, root_is_file=True),
}


def corpus_info(corpus: str, option: str = "data.corpus") -> CorpusInfo:
    """The registry entry of ``corpus``; ValueError naming ``option`` if unknown."""
    if corpus not in CORPORA:
        raise ValueError(f"{option}: unknown corpus '{corpus}'; choose from {sorted(CORPORA)}")
    return CORPORA[corpus]


def corpus_classes(corpus: str, root: str | Path | None = None) -> tuple[str, ...]:
    """The common-vocabulary classes ``corpus`` has (for a manifest: those its CSV file ``root`` uses)."""
    info = corpus_info(corpus)
    if info.classes is not None:
        return info.classes
    if root is None:
        raise ValueError(f"data.root: corpus '{corpus}' needs the path of its CSV file")
    return manifest_labels(root)


def scan_corpus(corpus: str, root: str | Path, emotions: Sequence[str], lenient: bool = False) -> ScanResult:
    """Scan ``root`` with the scanner registered for ``corpus``."""
    return corpus_info(corpus).scan(root, emotions, lenient=lenient)
