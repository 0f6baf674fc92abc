"""Registry of corpus scanners: each maps (root, emotions, lenient) to a ScanResult."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .ravdess import ScanResult, scan_ravdess

Scanner = Callable[..., ScanResult]
CORPORA: dict[str, Scanner] = {"ravdess": scan_ravdess}


def scan_corpus(corpus: str, root: str | Path, emotions: Sequence[str], lenient: bool = False) -> ScanResult:
    """Scan ``root`` with the scanner registered for ``corpus``."""
    if corpus not in CORPORA:
        raise ValueError(f"data.corpus: unknown corpus '{corpus}'; choose from {sorted(CORPORA)}")
    return CORPORA[corpus](root, emotions, lenient=lenient)
