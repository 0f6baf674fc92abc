"""``cv``: k-fold cross-validation (optionally repeated with several random seeds), resumable; ``cv-report``.

Each run (fold, repeat) is ``run.fold.run_fold``: fit on the fold's training speakers, the checkpoint
chosen by its validation speakers, tested once on its test speakers beside the linear baselines, the
result in ``OUT/fold_K/result.json`` (``OUT/fold_K_repeat_R/`` for repeats after the first). A rerun
skips complete runs and resumes an interrupted one from its last checkpoint, whichever executor ran
it (``executors``). ``OUT/study.json`` records what the study is (``plan.open_study``).
"""
from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from pathlib import Path

from ser_lightning.errors import CommandParser, DataError, UsageError
from ser_lightning.outputs import check_writable
from ser_lightning.run.fold import RunSpec, run_fold
from ser_lightning.run.identity import StudyRecord, study_config
from ser_lightning.run.result import RunResult, load_result
from ser_lightning.studies.executors import (
    EXECUTORS, ExecutorOptions, WorkerDied, add_executor_arguments, executor_options, open_executor,
)
from ser_lightning.studies.plan import open_study, parse_folds, plan_runs, study_settings
from ser_lightning.studies.report import write_report

MAX_ATTEMPTS = 3
"""A run whose worker dies is started again up to this many times in all."""


class Progress:
    """The study-level progress line: runs done, running, failed, elapsed time and ETA."""

    def __init__(self, runs: Sequence[RunSpec]) -> None:
        self.total, self.done, self.failed, self.running = len(runs), 0, 0, 0
        self.started, self.durations = time.monotonic(), []

    def line(self, event: str) -> str:
        elapsed = time.monotonic() - self.started
        left = self.total - self.done - self.failed
        eta = ""
        if self.durations and left:
            parallel = max(1, self.running)
            eta = f", ETA {_clock(sum(self.durations) / len(self.durations) * left / parallel)}"
        return (f"[study] {event} | {self.done}/{self.total} done, {self.running} running, {self.failed} failed, "
                f"elapsed {_clock(elapsed)}{eta}")

    def print(self, event: str) -> None:
        print(self.line(event), flush=True)

    def starting(self, spec: Hashable) -> None:
        """A run starts in this process (the local executor)."""
        self.running = 1
        self.print(f"{_name(spec)}: running")

    def finished(self, spec: RunSpec, result: RunResult | None, error: BaseException | None, running: int) -> None:
        """Count a run that ended (with a result, or the error that stopped it) and print the line."""
        self.running = running
        if result is None:
            self.failed += 1
            self.print(f"{_name(spec)}: FAILED ({_reason(error)})")
            return
        self.done += 1
        self.durations.append(result.seconds)
        self.print(f"{_name(spec)}: {_summary(result)}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _name(spec: RunSpec) -> str:
    return f"fold {spec.fold}" + (f" repeat {spec.repeat}" if spec.repeat else "")


def _reason(error: BaseException | None) -> str:
    return str(error) if isinstance(error, WorkerDied) else f"{type(error).__name__}: {error}"


def _summary(result: RunResult) -> str:
    text = f"test UA {100 * result.metrics['UA']:.1f} %"
    baseline = result.baselines.get("pooled")
    return text + (f" (baseline {100 * baseline.metrics['UA']:.1f} %)" if baseline else "")


def pending_runs(runs: Sequence[RunSpec], progress: Progress) -> list[RunSpec]:
    """The runs without a result yet; finished ones are reported as skipped."""
    pending = []
    for spec in runs:
        result = load_result(spec.folder)
        if result is None:
            pending.append(spec)
        else:
            progress.done += 1
            progress.print(f"{_name(spec)}: complete, skipped ({_summary(result)})")
    return pending


def run_study(runs: Sequence[RunSpec], options: ExecutorOptions) -> None:
    """Run every unfinished run of the study with the chosen executor.

    Run here (``local``), a run's error ends the study; run elsewhere, the other runs go on and the study
    ends with an error that counts the failed ones (a rerun retries them).
    """
    progress = Progress(runs)
    todo = pending_runs(runs, progress)
    with open_executor(options, attempts=MAX_ATTEMPTS, on_start=progress.starting) as executor:
        for spec in todo:
            executor.submit(spec, run_fold, spec)
        if todo and executor.where:
            progress.running = executor.running
            progress.print(f"{len(todo)} run(s) submitted to {executor.where}")
        while executor.busy:
            finished = executor.next_finished()
            if finished.error is not None and options.kind == "local":
                raise finished.error
            progress.finished(finished.key, finished.result, finished.error, executor.running)
    if progress.failed:
        raise DataError(f"[study] {progress.failed} run(s) failed; rerun the same command to retry them "
                        "(finished runs are kept)")


def cv_main(argv: list[str]) -> None:
    """Speaker-independent k-fold cross-validation with the linear baseline on the same folds."""
    parser = CommandParser(
        prog="python -m ser_lightning cv", description=cv_main.__doc__,
        epilog="Any configuration option can follow (--config FILE|NAME, --data.root DIR, --trainer.max_epochs N).",
    )
    parser.add_argument("--folds", type=int, help="number of folds (default: the config's data.num_folds)")
    parser.add_argument("--only", help="comma-separated fold indices to run here (merge later with cv-report)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per fold with seeds seed_everything + 0..R-1; the report separates the variance "
                             "over folds from the variance over seeds (default 1)")
    parser.add_argument("--out", type=Path, default=Path("cv_runs"), help="output folder (default: cv_runs)")
    parser.add_argument("--new_out", action="store_true",
                        help="when --out holds a study of another configuration, write to a new folder beside it "
                             "(OUT-2, OUT-3, ...) instead of stopping")
    add_executor_arguments(parser, EXECUTORS, "run")
    parser.add_argument("--gpus_per_worker", type=float, default=0.0, help="GPU share per run with ray (e.g. 0.25)")
    args, lightning_args = parser.parse_known_args(argv)
    executor = executor_options(parser, args)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.folds is not None and args.folds < 2:
        parser.error(f"--folds must be >= 2, got {args.folds}")
    check_writable(args.out, "--out")
    from ser_lightning.parser import lines_held_until_accepted

    with lines_held_until_accepted(release=False):  # a rejected study prints only its error
        settings = study_settings(lightning_args, args.folds)
        parse_folds(args.only, settings.num_folds)
    out = open_study(args.out, StudyRecord("cv", study_config(settings.config)), new_out=args.new_out)
    runs = plan_runs(settings, out, args.only, args.repeats)
    run_study(runs, executor)
    report = write_report([out], out)
    print(report["markdown"])
    print(f"[cv] report written to {out}")


def cv_report_main(argv: list[str]) -> None:
    """Merge fold results (e.g. from --only runs on several machines) into one report."""
    parser = CommandParser(prog="python -m ser_lightning cv-report", description=cv_report_main.__doc__)
    parser.add_argument("dirs", type=Path, nargs="+", help="folders holding fold_K/result.json")
    parser.add_argument("--out", type=Path, help="where to write the report (default: the first folder)")
    args = parser.parse_args(argv)
    missing = [str(folder) for folder in args.dirs if not folder.is_dir()]
    if missing:
        raise UsageError(f"cv-report: no such folder(s): {', '.join(missing)}")
    check_writable(args.out or args.dirs[0], "--out")
    report = write_report(args.dirs, args.out or args.dirs[0])
    print(report["markdown"])
