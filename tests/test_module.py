"""SERModule: steps, class weights, option validation, a short training loop, figures."""

import types
import warnings

import lightning
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from ser_lightning.models import SERModule
from ser_lightning.models.module import class_weights_from_counts
from ser_lightning.ops import fused_available
from ser_lightning.plotting import attention_figure, confusion_matrix_figure

NUM_FEATURES = 4
CLASS_NAMES = ["neutral", "happy", "sad"]


def collate(items: list[tuple[int, torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([x.shape[-1] for _, x, _ in items])
    features = torch.zeros(len(items), items[0][1].shape[0], int(lengths.max()))
    for i, (_, x, _) in enumerate(items):
        features[i, :, : x.shape[-1]] = x
    return {
        "features": features,
        "lengths": lengths,
        "labels": torch.tensor([y for _, _, y in items]),
        "index": torch.tensor([i for i, _, _ in items]),
    }


class TinyDataModule(lightning.LightningDataModule):
    """Random variable-length features whose mean depends on the class, split 24/9/9."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.class_names = CLASS_NAMES
        self.num_classes = len(CLASS_NAMES)
        self.num_features = NUM_FEATURES
        items = []
        for index in range(42):
            label = index % self.num_classes
            frames = int(torch.randint(120, 260, (1,), generator=generator))
            x = torch.randn(NUM_FEATURES, frames, generator=generator) + 2.0 * label + 5.0
            items.append((index, x, label))
        self.splits = {"train": items[:24], "val": items[24:33], "test": items[33:]}

    @property
    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        frames = torch.cat([x for _, x, _ in self.splits["train"]], dim=1)
        return frames.mean(dim=1), frames.std(dim=1)

    def class_counts(self, split: str) -> torch.Tensor:
        return torch.bincount(torch.tensor([y for _, _, y in self.splits[split]]), minlength=self.num_classes)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=5, collate_fn=collate, shuffle=split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


def make_module(**kwargs) -> SERModule:
    options = dict(num_features=NUM_FEATURES, num_classes=3, class_names=CLASS_NAMES, backend="reference")
    options.update(kwargs)
    return SERModule(**options)


def fake_batch(num_features: int = NUM_FEATURES) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return collate([(i, torch.randn(num_features, n), i % 3) for i, n in enumerate((200, 90, 170))])


def trainer(tmp_path, **kwargs) -> lightning.Trainer:
    options = dict(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, deterministic=True,
    )
    options.update(kwargs)
    return lightning.Trainer(**options)


@pytest.fixture(autouse=True)
def quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|self.log|reference implementation).*")
        yield


# ----------------------------------------------------------------------------- steps and options
@pytest.mark.parametrize("arch, num_features, extra", [("seed1d", NUM_FEATURES, {}), ("zhang2d", 70, {"width": 0.1})])
def test_training_and_validation_step_on_a_fake_batch(arch, num_features, extra):
    module = make_module(arch=arch, num_features=num_features, **extra)
    batch = fake_batch(num_features)
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad)
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
        predictions = module.predict_step(batch, 0)
    assert predictions["probabilities"].shape == (3, 3)
    torch.testing.assert_close(predictions["probabilities"].sum(dim=1), torch.ones(3))
    assert torch.equal(predictions["predictions"], predictions["probabilities"].argmax(dim=1))
    assert torch.equal(predictions["index"], batch["index"])
    assert predictions["alpha"].shape[0] == 3 and predictions["positions"].dtype == torch.int64


def test_class_weights_from_counts():
    weights = class_weights_from_counts(torch.tensor([10, 20, 0, 10]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.5, 0.0, 1.0]))


def test_setup_fills_buffers_from_the_datamodule_and_warns_on_missing_classes():
    module = make_module()
    datamodule = TinyDataModule()
    datamodule.class_counts = lambda split: torch.tensor([6, 0, 18])
    module._trainer = types.SimpleNamespace(datamodule=datamodule)
    with pytest.warns(UserWarning, match="no training examples of \\['happy'\\]"):
        module.setup("fit")
    mean, std = datamodule.feature_stats
    torch.testing.assert_close(module.feature_mean, mean)
    torch.testing.assert_close(module.feature_std, std)
    torch.testing.assert_close(module.class_weights, torch.tensor([24 / 18, 0.0, 24 / 54]))


@pytest.mark.parametrize(
    "options, option_name",
    [
        ({"lam": 0.0}, "model.lam"),
        ({"lam": -1.0}, "model.lam"),
        ({"arch": "resnet"}, "model.arch"),
        ({"width": 0.0}, "model.width"),
        ({"num_classes": 1, "class_names": None}, "model.num_classes"),
        ({"class_names": ["a", "b"]}, "model.class_names"),
        ({"normalization": "batch"}, "model.normalization"),
        ({"backend": "triton"}, "model.backend"),
        ({"lr": 0.0}, "model.lr"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"arch": "zhang2d", "num_features": 8}, "model.num_features"),
    ],
)
def test_invalid_options_raise_naming_the_option(options, option_name):
    with pytest.raises(ValueError, match=option_name.replace(".", "\\.")):
        make_module(**options)


@pytest.mark.parametrize("normalization", ["global", "utterance", "none"])
def test_module_forward_is_batch_independent_in_every_normalization_mode(normalization):
    torch.manual_seed(4)
    module = make_module(normalization=normalization).eval()
    module.feature_mean.fill_(5.0)
    module.feature_std.fill_(2.0)
    batch = fake_batch()
    with torch.no_grad():
        together = module(batch["features"] * 3 + 4, batch["lengths"]).logits
        for i, n in enumerate(batch["lengths"].tolist()):
            alone = module(batch["features"][i : i + 1, :, :n] * 3 + 4, batch["lengths"][i : i + 1]).logits
            torch.testing.assert_close(together[i], alone[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- training loop
def test_fit_validate_test_and_predict_with_a_trainer(tmp_path):
    lightning.seed_everything(0, workers=True)
    datamodule = TinyDataModule()
    module = make_module(lr=3e-3)
    fit_trainer = trainer(tmp_path, max_epochs=2)
    fit_trainer.fit(module, datamodule=datamodule)
    metrics = fit_trainer.callback_metrics
    for name in ("train/loss", "train/WA", "train/UA", "train/F1", "val/loss", "val/WA", "val/UA", "val/F1"):
        assert name in metrics and torch.isfinite(metrics[name]), name
    mean, std = datamodule.feature_stats
    torch.testing.assert_close(module.feature_mean, mean)
    torch.testing.assert_close(module.feature_std, std)
    torch.testing.assert_close(module.class_weights, torch.ones(3))  # 8 training examples of each class

    results = fit_trainer.test(module, datamodule=datamodule, verbose=False)[0]
    assert module.test_confusion.shape == (3, 3) and int(module.test_confusion.sum()) == 9
    expected_recall = module.test_confusion.diagonal() / module.test_confusion.sum(dim=1)
    torch.testing.assert_close(module.test_per_class_recall, expected_recall.float())
    torch.testing.assert_close(torch.tensor(results["test/UA"]), expected_recall.mean(), rtol=0, atol=1e-6)
    for k, name in enumerate(CLASS_NAMES):
        assert results[f"test/recall_{name}"] == pytest.approx(float(expected_recall[k]))

    batches = fit_trainer.predict(module, datamodule=datamodule)
    assert sum(len(b["index"]) for b in batches) == 9
    assert all(b["probabilities"].shape[1] == 3 for b in batches)


def test_fit_with_tensorboard_logs_figures_and_checkpoints_on_val_ua(tmp_path):
    lightning.seed_everything(0, workers=True)
    logger = TensorBoardLogger(tmp_path, name="tb")
    logged: list[str] = []
    writer = logger.experiment
    original = writer.add_figure

    def add_figure(tag, figure, *args, **kwargs):
        assert isinstance(figure, Figure)
        logged.append(tag)
        return original(tag, figure, *args, **kwargs)

    writer.add_figure = add_figure
    module = make_module(num_attention_maps=2, early_stopping_patience=3)
    fit_trainer = trainer(tmp_path, logger=logger, enable_checkpointing=True)
    fit_trainer.fit(module, datamodule=TinyDataModule())
    # no figures during the sanity check: one validation epoch's worth
    assert logged == ["val/confusion_matrix", "val/attention_0", "val/attention_1"]
    checkpoints = sorted(p.name for p in (tmp_path / "tb" / "version_0" / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints
    assert any(name.startswith("epoch000-valUA") for name in checkpoints)
    assert module.hparams.early_stopping_patience == 3
    restored = SERModule.load_from_checkpoint(tmp_path / "tb" / "version_0" / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(restored.feature_mean, module.feature_mean)


def test_fit_in_bf16_mixed_precision(tmp_path):
    lightning.seed_everything(0, workers=True)
    module = make_module(backend="auto")
    fit_trainer = trainer(tmp_path, precision="bf16-mixed", num_sanity_val_steps=0)
    fit_trainer.fit(module, datamodule=TinyDataModule())
    assert torch.isfinite(fit_trainer.callback_metrics["train/loss"])
    assert torch.isfinite(fit_trainer.callback_metrics["val/UA"])


@pytest.mark.skipif(not fused_available("cpu"), reason="the fused attention extension (ser_lightning._C) is not built")
def test_training_with_fused_backend_matches_reference(tmp_path):
    losses = {}
    for backend in ("reference", "fused"):
        lightning.seed_everything(0, workers=True)
        module = make_module(backend=backend)
        fit_trainer = trainer(tmp_path / backend, num_sanity_val_steps=0)
        fit_trainer.fit(module, datamodule=TinyDataModule())
        losses[backend] = (fit_trainer.callback_metrics["train/loss"], fit_trainer.callback_metrics["val/loss"])
    for reference, fused in zip(losses["reference"], losses["fused"]):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- figures
def test_confusion_matrix_figure():
    matrix = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 0, 5]])
    for normalize in (True, False):
        assert isinstance(confusion_matrix_figure(matrix, CLASS_NAMES, normalize=normalize), Figure)
    with pytest.raises(ValueError, match="confusion matrix"):
        confusion_matrix_figure(matrix, ["a", "b"])


def test_attention_figures_for_both_layouts():
    features = torch.randn(64, 180)
    one_d = attention_figure(features, torch.softmax(torch.randn(9), 0), (9,), "seed1d",
                             probabilities=torch.tensor([0.1, 0.7, 0.2]), class_names=CLASS_NAMES)
    assert isinstance(one_d, Figure)
    two_d = attention_figure(features, torch.softmax(torch.randn(15), 0), (5, 3), "zhang2d", title="utterance")
    assert isinstance(two_d, Figure)
    with pytest.raises(ValueError, match="positions_shape"):
        attention_figure(features, torch.ones(4), (5, 3), "zhang2d")
