"""Reading checkpoints safely: a checkpoint a user was given must never run code when it is loaded.

Every checkpoint is read with ``torch.load(weights_only=True)``: only tensors and plain Python
types (dicts, lists, strings, numbers) are accepted, plus the project's own two configuration
records that earlier versions stored (``FeatureConfig``, ``SpecAugmentConfig``). A file that needs
anything else is refused with ``UnsafeCheckpointError``, naming the file and the type; a user who
trusts the file can pass ``trusted=True`` (``--trust_checkpoint`` on the command line), which
loads it with the unrestricted unpickler after a warning.
"""
from __future__ import annotations

import inspect
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ser_lightning.data.features import FeatureConfig, SpecAugmentConfig
from ser_lightning.errors import DataError, os_error_text

SAFE_GLOBALS = (FeatureConfig, SpecAugmentConfig)
RENAMED_FEATURES = {"seed_contour": "loudness_contour"}
"""Feature names of earlier versions -> today's."""


class CheckpointError(DataError, ValueError):
    """A checkpoint is missing, unreadable, or disagrees with its own configuration."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs more than the safe loader allows (it could run code when loaded)."""


def safe_loading() -> Any:
    """Context in which ``torch.load(weights_only=True)`` also accepts the project's own configuration records."""
    return torch.serialization.safe_globals(list(SAFE_GLOBALS))


FILE_KINDS = {b"RIFF": "a WAV audio file", b"fLaC": "a FLAC audio file", b"OggS": "an Ogg audio file",
              b"ID3": "an MP3 audio file", b"\x89PNG": "a PNG image", b"%PDF": "a PDF document"}
"""Magic numbers of files people give by mistake, to say what they gave instead of a checkpoint."""


def check_checkpoint_file(path: Path) -> None:
    """CheckpointError unless ``path`` is a readable file that starts like one ``torch.save`` writes (zip or pickle)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as error:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({os_error_text(error, path)})") from error
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # a zip archive, or a pickle (torch before 1.6)
        return
    kind = next((name for magic, name in FILE_KINDS.items() if head.startswith(magic)), None)
    described = kind or ("an empty file" if not head else f"a file starting with {head!r}")
    raise CheckpointError(f"checkpoint {path}: not a checkpoint written by fit or cv (it is {described})")


def read_checkpoint(path: str | Path, *, trusted: bool = False) -> dict[str, Any]:
    """The checkpoint's dictionary, read safely (see the module docstring)."""
    path = Path(path)
    check_checkpoint_file(path)
    if trusted:
        warnings.warn(f"checkpoint {path}: loading with the unrestricted unpickler (trusted): it can run code",
                      stacklevel=2)
    try:
        with safe_loading():
            checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error)) or re.search(r"global ([\w.]+)", str(error))
        offending = found.group(1) if found else "a type outside the safe list"
        raise UnsafeCheckpointError(
            f"checkpoint {path}: refused to load: it contains {offending}, which the safe loader does not allow "
            f"(unpickling it could run code). Only load it if you trust where it comes from: pass "
            f"--trust_checkpoint on the command line, or trusted=True in Python"
        ) from error
    except Exception as error:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"checkpoint {path}: not a Lightning checkpoint of SERModule (no hyper_parameters)")
    return checkpoint


def plain(value: Any) -> Any:
    """A configuration value as plain types (dataclasses and namespaces become dicts)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        return plain(value.as_dict())
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items() if k != "__path__"}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def feature_config(checkpoint: Mapping[str, Any], path: str | Path) -> FeatureConfig:
    """The feature configuration the checkpoint's model was trained with."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    if "feature" not in data:
        raise CheckpointError(f"checkpoint {path}: no data.feature configuration saved; pass feature=FeatureConfig(...)")
    return as_feature_config(data["feature"], path)


def as_feature_config(value: Any, path: str | Path) -> FeatureConfig:
    """A FeatureConfig from a saved value (dict or the record itself), with renamed features mapped."""
    options = plain(value)
    if not isinstance(options, Mapping):
        raise CheckpointError(f"checkpoint {path}: cannot read the feature configuration {value!r}")
    options = dict(options)
    options["name"] = RENAMED_FEATURES.get(options.get("name"), options.get("name"))
    known = set(inspect.signature(FeatureConfig).parameters)
    unknown = sorted(set(options) - known)
    if unknown:
        raise CheckpointError(f"checkpoint {path}: unknown data.feature options {unknown}")
    try:
        return FeatureConfig(**options)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: invalid data.feature configuration: {error}") from error


def model_options(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's model hyper-parameters that today's SERModule takes (older extras are dropped)."""
    from ser_lightning.models.module import SERModule

    known = set(inspect.signature(SERModule).parameters)
    return {k: v for k, v in plain(checkpoint["hyper_parameters"]).items() if k in known}


def load_module(path: str | Path, *, device: str | torch.device = "cpu", trusted: bool = False) -> Any:
    """Rebuild the SERModule of a checkpoint file (eval mode) without running code from the file."""
    return module_from_checkpoint(read_checkpoint(path, trusted=trusted), path, device=device)


def module_from_checkpoint(checkpoint: Mapping[str, Any], path: str | Path, *, device: str | torch.device = "cpu",
                           pretrained_alexnet: str | None = None) -> Any:
    """The SERModule (eval mode) of a checkpoint dictionary read by ``read_checkpoint``."""
    from ser_lightning.models.module import SERModule

    options = model_options(checkpoint)
    options["pretrained_alexnet"] = pretrained_alexnet  # weights come from the state dict, not the file
    try:
        module = SERModule(**options)
        module.load_state_dict(checkpoint["state_dict"])
    except Exception as error:
        raise CheckpointError(f"checkpoint {path}: cannot rebuild the model ({type(error).__name__}: {error})") from error
    return module.to(device).eval()
