"""Real-time factor of prediction: seconds of audio classified per wall-clock second.

Generates a folder of synthetic utterances (RAVDESS layout, 16 kHz), takes a checkpoint (`--ckpt`,
or else trains a 1-epoch demo-config model on that corpus through the command line: its speed
does not depend on its training) and times, with decoding and feature extraction included:

- single file: `EmotionRecognizer.predict_file` on each file in turn;
- batch: decode every file with soundfile, then one `EmotionRecognizer.predict_batch` call;
- command: `python -m ser_lightning predict --ckpt_path CKPT FOLDER --output results.csv`, in
  process (checkpoint loading and writing the CSV included).

    python benchmarks/bench_predict.py [--ckpt CKPT] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

from common import (QUICK_SPLIT, environment, fit_args, format_table, goal, print_environment, print_goals,
                    require_positive, set_threads, write_json)
from ser_lightning.data.records import DEFAULT_EMOTIONS
from ser_lightning.data.synth import synthesize_corpus
from ser_lightning.inference.commands import predict_main
from ser_lightning.inference.recognizer import EmotionRecognizer

GOAL_RTF = 100.0


def train_tiny_checkpoint(corpus: Path, workdir: Path) -> Path:
    """One epoch of the demo configuration on `corpus` through the command line; returns its checkpoint."""
    from ser_lightning.lightning_commands import fit_main

    fit_main(fit_args(workdir, workdir / "cache", 1, f"--data.root={corpus}", *QUICK_SPLIT,
                      "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--test_after_fit=false"))
    checkpoints = sorted(workdir.rglob("epoch*.ckpt"))
    if not checkpoints:
        raise SystemExit(f"training wrote no checkpoint under {workdir}")
    return checkpoints[0]


def measure(ckpt: Path, files: list[Path], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    recognizer = EmotionRecognizer.from_checkpoint(ckpt, batch_size=args.batch_size)
    audio_s = sum(sf.info(str(f)).duration for f in files)
    folder = workdir / "predict"
    folder.mkdir()
    for f in files:  # the command reads a folder: link exactly the measured files into one
        (folder / f"{f.parent.name}_{f.name}").symlink_to(f.resolve())
    recognizer.predict_file(files[0])  # warm-up (lazy initialisation)

    def single() -> None:
        for f in files:
            recognizer.predict_file(f)

    def batch() -> None:
        waves, rates = zip(*(sf.read(str(f), dtype="float32", always_2d=True) for f in files))
        if len(set(rates)) != 1:
            raise SystemExit("batch mode needs files of one sample rate")
        recognizer.predict_batch([w.mean(axis=1) for w in waves], rates[0])

    def command() -> None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            predict_main(["--ckpt_path", str(ckpt), str(folder), "--output", str(workdir / "results.csv")])

    modes = {"single file (predict_file)": single, "batch (decode + predict_batch)": batch,
             "command (predict FOLDER, incl. checkpoint load)": command}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):  # interleaved passes: every mode sees the same machine load
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, values in times.items():
        wall = statistics.median(values)
        results[name] = {"wall_s": wall, "rtf": audio_s / wall, "files_per_s": len(files) / wall}
    return {"checkpoint_arch": recognizer.arch, "feature": recognizer.feature.name, "files": len(files),
            "audio_s": audio_s, "batch_size": args.batch_size, "modes": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="checkpoint to use (default: train a 1-epoch demo model)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 12 files, one repeat")
    parser.add_argument("--actors", type=int, default=6, help="actors of the generated corpus (28 files each)")
    parser.add_argument("--files", type=int, default=None, help="files to predict (default: all; --quick 12)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved timed passes over the modes, median reported (default 3, --quick 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="utterances per predict_batch forward (default 16)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.files is None and args.quick:
        args.files = 12
    if args.ckpt is not None and not args.ckpt.is_file():
        raise SystemExit(f"--ckpt: no such file: {args.ckpt}")
    if args.actors < 4:
        raise SystemExit(f"--actors must be >= 4 (the 1-epoch model is trained on 3 speaker folds), got {args.actors}")
    require_positive(args, "files", "repeats", "batch_size")

    env = environment(torch.device("cpu"))
    print_environment(env)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = synthesize_corpus(workdir / "corpus", actors=args.actors, emotions=DEFAULT_EMOTIONS, random_seed=0)
        files = files[: args.files] if args.files else files
        ckpt, trained = args.ckpt, args.ckpt is None
        if trained:
            print("no --ckpt: training a 1-epoch demo-config model on the generated corpus "
                  "(prediction speed does not depend on the training)", flush=True)
            ckpt = train_tiny_checkpoint(workdir / "corpus", workdir / "train")
        result = measure(ckpt, files, workdir, args)
    result["checkpoint"] = "1-epoch demo model trained by this script" if trained else str(args.ckpt)
    print(f"\n{result['files']} files, {result['audio_s']:.1f} s of audio, model {result['checkpoint_arch']} "
          f"on {result['feature']}, checkpoint: {result['checkpoint']}, median of {args.repeats} pass(es)")
    rows = [[name, f"{m['wall_s']:.2f}", f"{m['files_per_s']:.1f}", f"{m['rtf']:.0f}x"]
            for name, m in result["modes"].items()]
    print(format_table(["mode", "wall s", "files/s", "real-time factor"], rows))
    print("real-time factor = seconds of audio / wall seconds (decoding and features included)")
    goals = [goal(f"CPU prediction >= {GOAL_RTF:g}x real time: {name}", m["rtf"], GOAL_RTF)
             for name, m in result["modes"].items()]
    print_goals(goals)
    write_json(args.json, {"benchmark": "predict", "quick": args.quick, "environment": env, **result, "goals": goals})


if __name__ == "__main__":
    main()
