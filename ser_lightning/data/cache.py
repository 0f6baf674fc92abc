"""On-disk cache of per-file features, keyed by (file, size, mtime, feature configuration), checksummed."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ser_lightning.errors import causes, os_error_text
from ser_lightning.outputs import OutputError

log = logging.getLogger(__name__)


def checksum(features: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{features.dtype}{tuple(features.shape)}".encode())
    digest.update(features.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Stores one tensor per (source file, feature configuration) under ``cache_dir``.

    Writes are atomic (temporary file + ``os.replace``). Each entry stores the SHA-256 of its
    tensor's bytes. An entry that cannot be read, does not match its source (path, size, mtime) or
    its checksum, has the wrong shape or holds non-finite values is recomputed and overwritten, with
    a warning; it is never used. A write that fails for lack of space or permission is a
    ``DataError`` naming the cache folder ("no space left on device: ...").
    """

    def __init__(self, cache_dir: str | Path, config_key: str) -> None:
        self.config_key = config_key
        digest = hashlib.sha256(config_key.encode()).hexdigest()[:16]
        self.dir = Path(cache_dir).expanduser() / "features" / digest
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _source_id(path: Path) -> dict:
        stat = path.stat()
        return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def entry_path(self, path: str | Path) -> Path:
        """Cache file for the current version of ``path``."""
        source = self._source_id(Path(path))
        key = f"{source['source']}|{source['size']}|{source['mtime_ns']}|{self.config_key}"
        return self.dir / f"{hashlib.sha256(key.encode()).hexdigest()}.pt"

    def _load(self, entry: Path, source: dict, num_features: int | None) -> torch.Tensor | None:
        """The cached tensor, or None (with a warning when an entry exists but is unusable)."""
        if not entry.exists():
            return None
        try:
            data = torch.load(entry, map_location="cpu", weights_only=True)
            features = data["features"]
            problem = None
            if any(data.get(k) != v for k, v in source.items()) or data.get("config") != self.config_key:
                problem = "it belongs to another version of the file or configuration"
            elif not isinstance(features, torch.Tensor) or features.dim() != 2:
                problem = "it does not hold a (features, frames) tensor"
            elif num_features is not None and features.shape[0] != num_features:
                problem = f"it has {features.shape[0]} features instead of {num_features}"
            elif "sha256" not in data:  # written before entries carried checksums: replaced without a warning
                log.debug("replacing cache entry %s (no checksum)", entry)
                return None
            elif data["sha256"] != checksum(features):
                problem = "its checksum does not match its contents"
            elif not torch.isfinite(features).all():
                problem = "it holds non-finite values"
        except Exception as err:  # any unreadable entry (truncated, garbage, wrong format) is rebuilt
            problem = f"it cannot be read ({type(err).__name__}: {err})"
        if problem:
            log.warning("rebuilding cache entry %s for %s: %s", entry, source["source"], problem)
            return None
        return features

    def _save(self, entry: Path, source: dict, features: torch.Tensor) -> None:
        features = features.contiguous()
        record = {**source, "config": self.config_key, "sha256": checksum(features), "features": features}
        tmp = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pt")
            with os.fdopen(fd, "wb") as handle:
                torch.save(record, handle)
            os.replace(tmp, entry)
        except BaseException as error:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            cause = next((e for e in causes(error) if isinstance(e, OSError)), None)
            if cause is not None:  # torch reports a failed write as "enforce fail at inline_container.cc"
                raise OutputError(f"feature cache (data.cache_dir): {os_error_text(cause, self.dir)}") from error
            raise

    def lookup(self, path: str | Path, num_features: int | None = None) -> torch.Tensor | None:
        """Cached features of the current version of ``path``, or None (counted as a miss)."""
        path = Path(path)
        features = self._load(self.entry_path(path), self._source_id(path), num_features)
        if features is None:
            self.misses += 1
        else:
            self.hits += 1
        return features

    def store(self, path: str | Path, features: torch.Tensor) -> None:
        """Keep ``features`` as the entry of the current version of ``path``."""
        path = Path(path)
        self._save(self.entry_path(path), self._source_id(path), features)

    def get_or_compute(
        self, path: str | Path, compute: Callable[[], torch.Tensor], num_features: int | None = None
    ) -> torch.Tensor:
        """Cached features of ``path``, or ``compute()`` stored for next time."""
        features = self.lookup(path, num_features)
        if features is None:
            features = compute()
            self.store(path, features)
        return features
