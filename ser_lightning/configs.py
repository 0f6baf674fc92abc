"""Where the shipped configurations live, and the default one.

From a source checkout (or an editable install) they are the repository's ``configs/`` folder; a
regular install copies them to ``<prefix>/share/ser-lightning/configs``. ``--config NAME`` accepts
a path or the name of a shipped configuration (``recommended`` or ``recommended.yaml``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ser_lightning.errors import UsageError

DEFAULT_CONFIG = "demo.yaml"


def config_dirs() -> list[Path]:
    """The folders searched for shipped configurations, in order."""
    return [Path(__file__).resolve().parents[1] / "configs", Path(sys.prefix) / "share" / "ser-lightning" / "configs"]


def find_config(name: str) -> Path:
    """A configuration file by path, or by the name of a shipped configuration; UsageError naming the places looked."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    candidates = [folder / file for folder in config_dirs() for file in (name, f"{name}.yaml")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = sorted({p.stem for folder in config_dirs() if folder.is_dir() for p in folder.glob("*.yaml")})
    raise UsageError(
        f"--config {name}: no such file, and no shipped configuration of that name (looked in "
        f"{', '.join(str(folder) for folder in config_dirs())}; shipped: {shipped or 'none found'})"
    )


def with_default_config(args: list[str]) -> list[str]:
    """``args`` with every ``--config`` resolved; ``--config demo.yaml`` first when none is given."""
    resolved, given = [], False
    position = 0
    while position < len(args):
        arg = args[position]
        if arg == "--config" and position + 1 < len(args):
            resolved += ["--config", str(find_config(args[position + 1]))]
            given, position = True, position + 2
            continue
        if arg.startswith("--config="):
            resolved.append(f"--config={find_config(arg.split('=', 1)[1])}")
            given = True
        else:
            resolved.append(arg)
        position += 1
    return resolved if given else ["--config", str(find_config(DEFAULT_CONFIG)), *resolved]
