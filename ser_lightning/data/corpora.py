"""The corpus registry: one entry per corpus module (each module holds everything about its corpus).

| corpus   | root     | classes (common vocabulary)                                    |
|----------|----------|----------------------------------------------------------------|
| ravdess  | folder   | all eight                                                      |
| cremad   | folder   | neutral happy sad angry fearful disgust                        |
| tess     | folder   | neutral happy sad angry fearful disgust surprised (2 speakers) |
| savee    | folder   | neutral happy sad angry fearful disgust surprised              |
| emodb    | folder   | neutral happy sad angry fearful disgust (boredom skipped)      |
| manifest | CSV file | the vocabulary labels used in the file                         |
| emobox   | folder   | the vocabulary labels of its EmoBox manifests (label_map.json) |

Adding a corpus means writing its module (parser, classes, speakers, synthetic layout, a ``CORPUS``
entry) and adding that entry here.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import cremad, emobox, emodb, manifest, ravdess, savee, tess
from .records import Corpus, ScanResult

CORPORA: dict[str, Corpus] = {
    module.CORPUS.name: module.CORPUS for module in (ravdess, cremad, tess, savee, emodb, manifest, emobox)
}


def corpus_info(name: str, option: str = "data.corpus") -> Corpus:
    """The registry entry of ``name``; ValueError naming ``option`` if unknown."""
    if name not in CORPORA:
        raise ValueError(f"{option}: unknown corpus '{name}'; choose from {sorted(CORPORA)}")
    return CORPORA[name]


def corpus_classes(name: str, root: str | Path | None = None, allow_outside_root: bool = False) -> tuple[str, ...]:
    """The common-vocabulary classes a corpus has (manifest, emobox: those its data at ``root`` uses)."""
    corpus = corpus_info(name)
    if corpus.classes is not None:
        return corpus.classes
    if root is None or corpus.read_classes is None:
        raise ValueError(f"data.root: corpus '{name}' needs data.root to read its classes from")
    return corpus.read_classes(Path(root), allow_outside_root=allow_outside_root)


def scan_corpus(
    name: str, root: str | Path, emotions: Sequence[str], lenient: bool = False, allow_outside_root: bool = False
) -> ScanResult:
    """Scan ``root`` with the scanner registered for corpus ``name``.

    ``allow_outside_root`` applies to corpora that list their files (manifest, EmoBox): their
    entries must lie inside the corpus root unless it is true. Folder corpora find their files
    inside the root by construction (links to folders elsewhere are followed: the owner made them).
    """
    corpus = corpus_info(name)
    if corpus.lists_paths:
        return corpus.scan(root, emotions, lenient=lenient, allow_outside_root=allow_outside_root)
    return corpus.scan(root, emotions, lenient=lenient)
