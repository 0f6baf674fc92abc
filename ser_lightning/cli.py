"""``python -m ser_lightning COMMAND ...``: one table of commands, each a function ``main(argv)``.

Nothing heavy is imported until a command runs, so ``--help`` is instant. ``main`` is the one place
where errors end a command: one line on stderr and exit status 2 (usage) or 1 (data, runtime), the
traceback only with ``--debug`` or ``SER_LIGHTNING_DEBUG=1`` (see ``ser_lightning.errors``).
"""
from __future__ import annotations

import importlib
import sys

from ser_lightning.errors import UsageError, debug_requested, describe
from ser_lightning.runtime import end_process_group, keep_freed_memory

# name: (one line of help, "module:function" taking the remaining arguments)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("train one fold, then test the checkpoint its validation speakers chose",
            "ser_lightning.lightning_commands:fit_main"),
    "validate": ("evaluate a checkpoint on the fold's validation speakers", "ser_lightning.lightning_commands:validate_main"),
    "test": ("evaluate a checkpoint on the fold's test speakers", "ser_lightning.lightning_commands:test_main"),
    "predict-split": ("predict the fold's test split with a checkpoint into a CSV file",
                      "ser_lightning.lightning_commands:predict_split_main"),
    "cv": ("k-fold cross-validation with the linear baseline on the same folds, and a report",
           "ser_lightning.studies.cv:cv_main"),
    "cv-report": ("merge fold results (e.g. from --only runs) into one report", "ser_lightning.studies.cv:cv_report_main"),
    "tune": ("nested hyper-parameter search: inner validation speakers choose, outer test folds report",
             "ser_lightning.studies.tune:tune_main"),
    "predict": ("classify audio files or folders with a checkpoint", "ser_lightning.inference.commands:predict_main"),
    "export": ("export a checkpoint to ONNX, checked against PyTorch", "ser_lightning.inference.commands:export_main"),
    "serve": ("serve a model over HTTP and WebSocket, with a web page for the microphone and files",
              "ser_lightning.inference.serve:serve_main"),
    "synth": ("write a synthetic corpus in the layout of a real one", "ser_lightning.data.synth:synth_main"),
}
LOOP_COMMANDS = frozenset({"fit", "validate", "test", "predict-split", "cv", "tune", "predict"})
"""Commands that loop over many batches or files (training, evaluation, prediction): they get the allocator settings
(``runtime.keep_freed_memory``; ``serve`` applies them itself). ``predict`` of 180 files with the recommended
features took 7.7 s with them against 10.0 s without, start-up included (fresh pages for every file's pitch track)."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m ser_lightning COMMAND [options]   (COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (text, _) in COMMANDS.items()]
    lines += ["", "fit, validate, test, predict-split, cv and tune read a configuration: --config FILE|NAME "
              "(default: demo) plus --section.option value overrides; --print_config shows it.",
              "An error ends a command in one line (exit status 2: usage, 1: data or runtime); --debug (or "
              "SER_LIGHTNING_DEBUG=1) shows the traceback."]
    return "\n".join(lines)


def run_command(argv: list[str]) -> None:
    """Run ``COMMAND ARGS...`` (errors propagate)."""
    if argv[0] not in COMMANDS:
        raise UsageError(f"unknown command '{argv[0]}'; the commands are {', '.join(COMMANDS)} "
                         "(python -m ser_lightning --help)")
    if argv[0] in LOOP_COMMANDS:
        keep_freed_memory()
    module, function = COMMANDS[argv[0]][1].split(":")
    try:
        getattr(importlib.import_module(module), function)(argv[1:])
    finally:
        end_process_group()


def main(argv: list[str] | None = None) -> None:
    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    try:
        run_command(argv)
    except (Exception, KeyboardInterrupt) as error:
        if debug:
            raise
        status, line = describe(error)
        print(f"error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(status) from None


if __name__ == "__main__":
    main()
