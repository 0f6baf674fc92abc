"""`cv`: k-fold cross-validation, one fold at a time, resumable.

Each fold trains on its training speakers, lets its validation speakers choose the checkpoint
(best validation UA), then tests that checkpoint once on its test speakers. Results go to
`OUT/fold_K/result.json` (written atomically); a rerun skips complete folds and resumes an
interrupted one from its last checkpoint.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import yaml

from ser_lightning.evaluation.report import atomic_write_text, write_report

RUN_NAME = "run"


def fold_dir(out: Path, fold: int) -> Path:
    return out / f"fold_{fold}"


def config_key(config: dict) -> str:
    """Hash of everything in the configuration that must agree across the folds of one report."""
    config = json.loads(json.dumps(config, default=str))
    config.get("data", {}).pop("fold", None)
    config.get("trainer", {}).pop("logger", None)
    config.get("trainer", {}).pop("default_root_dir", None)
    config.pop("config", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def load_fold_result(out: Path, fold: int) -> dict | None:
    path = fold_dir(out, fold) / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_fold(lightning_args: list[str], out: Path, fold: int, num_folds: int) -> dict:
    """Fit fold `fold`, test its best checkpoint, and return (and store) the fold's result."""
    from ser_lightning.cli import run_lightning

    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out), "name": f"fold_{fold}", "version": RUN_NAME},
    }
    cli = run_lightning(
        [*lightning_args, f"--data.fold={fold}", f"--data.num_folds={num_folds}",
         f"--trainer.logger={json.dumps(logger)}"],
        run=False,
    )
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_link_targets=False, skip_none=False))
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    last = fold_dir(out, fold) / RUN_NAME / "checkpoints" / "last.ckpt"
    start = time.monotonic()
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None)
    best = trainer.checkpoint_callback.best_model_path
    metrics = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)[0]
    confusion = model.test_confusion.to(torch.int64)
    plan = datamodule.fold_plan
    class_names = list(datamodule.class_names)
    recall = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
    result = {
        "fold": fold,
        "num_folds": num_folds,
        "config_key": config_key(config),
        "config": config,
        "protocol": plan.protocol,
        "speaker_dependent": plan.speaker_dependent,
        "seed_everything": config.get("seed_everything"),
        "data_seed": config["data"]["seed"],
        "class_names": class_names,
        "metrics": {name: float(metrics[f"test/{name}"]) for name in ("WA", "UA", "F1")},
        "per_class_recall": dict(zip(class_names, recall.tolist())),
        "confusion_matrix": confusion.tolist(),
        "num_test_utterances": len(plan.test),
        "test_utterances": [str(datamodule.utterances[i].path) for i in plan.test],
        "train_speakers": plan.train_speakers,
        "val_speakers": plan.val_speakers,
        "test_speakers": plan.test_speakers,
        "best_checkpoint": best,
        "best_val_UA": float(trainer.checkpoint_callback.best_model_score or float("nan")),
        "epochs_trained": trainer.current_epoch,
        "wall_seconds": time.monotonic() - start,
    }
    atomic_write_text(fold_dir(out, fold) / "result.json", json.dumps(result, indent=2))
    return result


def parse_folds(spec: str | None, num_folds: int) -> list[int]:
    if spec is None:
        return list(range(num_folds))
    folds = sorted({int(part) for part in spec.split(",") if part.strip()})
    bad = [f for f in folds if not 0 <= f < num_folds]
    if bad:
        raise SystemExit(f"cv: --only {spec}: fold(s) {bad} outside 0..{num_folds - 1}")
    return folds


def configured_num_folds(lightning_args: list[str]) -> int:
    """The data.num_folds of the configuration (parsing it also validates it before any training)."""
    from ser_lightning.cli import run_lightning

    data = run_lightning(lightning_args, run=False).config.data
    if data.test_root is not None:
        raise SystemExit("cv: data.test_root is set (cross-corpus evaluation has one train/test split, not folds); "
                         "use `fit` for it")
    return int(data.num_folds)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def cv_main(argv: list[str]) -> None:
    """`cv [--folds K] [--only 0,3] [--out DIR] [LightningCLI options]`: speaker-independent k-fold CV."""
    parser = argparse.ArgumentParser(prog="python -m ser_lightning cv", description=cv_main.__doc__)
    parser.add_argument("--folds", type=int, help="number of folds (default: the config's data.num_folds)")
    parser.add_argument("--only", help="comma-separated fold indices to run here (merge later with cv-report)")
    parser.add_argument("--out", type=Path, default=Path("cv_runs"), help="output folder (default: cv_runs)")
    args, lightning_args = parser.parse_known_args(argv)
    configured = configured_num_folds(lightning_args)  # also validates the configuration before any training
    num_folds = args.folds or configured
    folds = parse_folds(args.only, num_folds)
    args.out.mkdir(parents=True, exist_ok=True)

    started, fold_times = time.monotonic(), []
    for position, fold in enumerate(folds):
        done = load_fold_result(args.out, fold)
        elapsed = time.monotonic() - started
        if done is not None:
            print(f"[cv] fold {fold} ({position + 1}/{len(folds)}): complete, skipped "
                  f"(test UA {100 * done['metrics']['UA']:.1f} %)", flush=True)
            continue
        eta = (sum(fold_times) / len(fold_times) * (len(folds) - position)) if fold_times else None
        print(f"[cv] fold {fold} ({position + 1}/{len(folds)}): running; elapsed {format_duration(elapsed)}"
              + (f", ETA {format_duration(eta)}" if eta is not None else ""), flush=True)
        result = run_fold(lightning_args, args.out, fold, num_folds)
        fold_times.append(result["wall_seconds"])
        print(f"[cv] fold {fold}: test WA {100 * result['metrics']['WA']:.1f} %, "
              f"UA {100 * result['metrics']['UA']:.1f} %, F1 {100 * result['metrics']['F1']:.1f} % "
              f"({format_duration(result['wall_seconds'])})", flush=True)

    report = write_report([args.out], args.out)
    print(report["markdown"])
    print(f"[cv] report written to {args.out} in {format_duration(time.monotonic() - started)}")


def cv_report_main(argv: list[str]) -> None:
    """`cv-report DIR [DIR ...] [--out OUT]`: merge fold results (e.g. from --only runs) into one report."""
    parser = argparse.ArgumentParser(prog="python -m ser_lightning cv-report", description=cv_report_main.__doc__)
    parser.add_argument("dirs", type=Path, nargs="+", help="folders holding fold_K/result.json")
    parser.add_argument("--out", type=Path, help="where to write the report (default: the first folder)")
    args = parser.parse_args(argv)
    report = write_report(args.dirs, args.out or args.dirs[0])
    print(report["markdown"])
