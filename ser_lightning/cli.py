"""The `python -m ser_lightning` command line.

Lightning's own subcommands (`fit`, `validate`, `test`, and `predict` under the name `predict-split`:
prediction over the datamodule's test split) run through LightningCLI with `configs/demo.yaml` as the
default configuration; `synth` writes a synthetic corpus; `predict` classifies audio files and
`export` writes an ONNX model (`ser_lightning.inference.commands`).
"""

import argparse
import importlib
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ser_lightning.data.datamodule import SERDataModule
from ser_lightning.models.module import SERModule

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# `cv` and the tests hand LightningCLI explicit argument lists on purpose.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


class SERLightningCLI(LightningCLI):
    """LightningCLI that links data properties into the model and tests the best checkpoint after `fit`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, evaluate the best checkpoint (chosen on validation UA) on the test fold.",
        )
        parser.link_arguments("data.normalization", "model.normalization")
        parser.link_arguments("data.num_features", "model.num_features", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def after_fit(self) -> None:
        """Report validation and test metrics of the best checkpoint, never selecting on the test fold."""
        if self.trainer.fast_dev_run or not self._get(self.config, "test_after_fit"):
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
        val = self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)
        test = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)
        if self.trainer.is_global_zero:
            print(summary_line("validation", val[0]) + "\n" + summary_line("test", test[0]))
            if ckpt_path:
                print(f"best checkpoint: {checkpoint.best_model_path}")
            if self.trainer.log_dir:
                print(f"TensorBoard: tensorboard --logdir {Path(self.trainer.log_dir).parent}")


def summary_line(split: str, metrics: dict[str, float]) -> str:
    prefix = "val" if split == "validation" else split
    parts = [f"{name} {100 * metrics[f'{prefix}/{name}']:.1f} %" for name in ("WA", "UA", "F1")]
    return f"{split:>10}: " + ", ".join(parts)


def run_lightning(args: list[str] | None, run: bool = True) -> SERLightningCLI:
    """Build (and by default run) the LightningCLI on the given arguments."""
    defaults = [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.exists() else []
    return SERLightningCLI(
        SERModule,
        SERDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={name: {"default_config_files": defaults} for name in LIGHTNING_SUBCOMMANDS}
        if run
        else {"default_config_files": defaults},
    )


def synth_main(argv: list[str]) -> None:
    """`synth OUT_DIR`: write a synthetic corpus in the layout of RAVDESS (default) or another corpus."""
    from ser_lightning.data.records import resolve_emotions
    from ser_lightning.data.synth import LAYOUTS, synthesize_corpus

    parser = argparse.ArgumentParser(prog="python -m ser_lightning synth", description=synth_main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layout", choices=LAYOUTS, default="ravdess", help="file-name convention to write")
    parser.add_argument(
        "--actors", type=int, help="number of speakers (default: 24 for ravdess, the layout's own default otherwise)"
    )
    parser.add_argument("--emotions", default="all", help="'all', 'default' or a comma-separated list of names")
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    emotions = resolve_emotions(args.emotions, option="--emotions")
    paths = synthesize_corpus(
        args.out_dir, actors=args.actors, emotions=emotions, sample_rate=args.sample_rate, seed=args.seed,
        layout=args.layout,
    )
    print(f"wrote {len(paths)} files to {args.out_dir}")


# Commands beyond Lightning's own: name -> "module:function(argv)", imported only when used.
COMMANDS = {
    "synth": "ser_lightning.cli:synth_main",
    "cv": "ser_lightning.evaluation.cv:cv_main",
    "cv-report": "ser_lightning.evaluation.cv:cv_report_main",
    "predict": "ser_lightning.inference.commands:predict_main",
    "export": "ser_lightning.inference.commands:export_main",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        module, function = COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    if argv and argv[0] == "predict-split":  # Lightning's own predict over the datamodule's test split
        argv[0] = "predict"
    # LightningCLI reads sys.argv itself when it holds exactly these arguments (as DDP relaunches expect).
    run_lightning(None if argv == sys.argv[1:] else argv)


if __name__ == "__main__":
    main()
