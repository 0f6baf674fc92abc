"""SERModule: steps, heads, class weights, option validation, fit-and-test, figures."""

import types
import warnings

import lightning
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from ser_lightning.callbacks import FigureCallback, ThrottledProgressBar
from ser_lightning.data.batches import collate_utterances
from ser_lightning.models.heads import HEADS, StatisticsHead
from ser_lightning.models.module import SERModule, class_weights_from_counts
from ser_lightning.normalization import feature_stats
from ser_lightning.ops import fused_available
from ser_lightning.plotting import attention_figure, confusion_matrix_figure
from ser_lightning.run.training import fit_and_test

NUM_FEATURES = 4
CLASS_NAMES = ["neutral", "happy", "sad"]


class TinyDataModule(lightning.LightningDataModule):
    """Random variable-length features whose mean depends on the class, split 24/9/9, two speakers per split."""

    def __init__(self, seed: int = 0, speaker_stats: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.class_names = CLASS_NAMES
        self.num_classes = len(CLASS_NAMES)
        self.num_features = NUM_FEATURES
        self.items = []
        for index in range(42):
            label = index % self.num_classes
            frames = int(torch.randint(120, 260, (1,), generator=generator))
            features = torch.randn(NUM_FEATURES, frames, generator=generator) + 2.0 * label + 5.0 + index % 2
            item = {"features": features, "label": label, "index": index}
            if speaker_stats:  # speaker = index parity
                item["speaker_stats"] = torch.stack([torch.full((NUM_FEATURES,), 7.0 + index % 2), torch.full((NUM_FEATURES,), 2.0)])
            self.items.append(item)
        self.splits = {"train": self.items[:24], "val": self.items[24:33], "test": self.items[33:]}

    @property
    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return feature_stats([item["features"] for item in self.splits["train"]])

    def class_counts(self, split: str) -> torch.Tensor:
        return torch.bincount(torch.tensor([item["label"] for item in self.splits[split]]), minlength=self.num_classes)

    def utterances_of(self, split: str) -> list:
        return [(item["features"], item.get("speaker_stats")) for item in self.splits[split]]

    def labels_of(self, split: str) -> list[int]:
        return [item["label"] for item in self.splits[split]]

    def speakers_of(self, split: str) -> list[str]:
        return [f"s{item['index'] % 4}" for item in self.splits[split]]

    def indices_of(self, split: str) -> list[int]:
        return [item["index"] for item in self.splits[split]]

    num_utterances = 42

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=5, collate_fn=collate_utterances, shuffle=split == "train")

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
    items = [{"features": torch.randn(num_features, n), "label": i % 3, "index": i,
              "speaker_stats": torch.stack([torch.zeros(num_features), torch.ones(num_features)])}
             for i, n in enumerate((200, 90, 170))]
    return collate_utterances(items)


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
        warnings.filterwarnings("ignore", message=".*(num_workers|self.log|reference implementation|LeafSpec).*")
        yield


# ----------------------------------------------------------------------------- steps and options
@pytest.mark.parametrize("arch, num_features, extra", [
    ("seed1d", NUM_FEATURES, {}),
    ("seed1d", NUM_FEATURES, {"width": 2.0, "dropout": 0.3, "statistics_head": "joint", "mixup_alpha": 0.4,
                              "normalization": "speaker"}),
    ("zhang2d", 70, {"width": 0.1}),
])
def test_training_and_validation_step_on_a_fake_batch(arch, num_features, extra):
    module = make_module(arch=arch, num_features=num_features, **extra)
    batch = fake_batch(num_features)
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    module.eval()
    with torch.no_grad():
        output = module.validation_step(batch, 0)
        predictions = module.predict_step(batch, 0)
    assert output.logits.shape == (3, 3)
    torch.testing.assert_close(predictions["probabilities"].sum(dim=1), torch.ones(3))
    assert torch.equal(predictions["predictions"], predictions["probabilities"].argmax(dim=1))
    assert torch.equal(predictions["index"], batch["index"])
    assert predictions["alpha"].shape[0] == 3 and predictions["positions"].dtype == torch.int64


def test_statistics_head_adds_its_logits_and_gets_its_own_loss():
    module = make_module(statistics_head="joint").eval()
    batch = fake_batch()
    step, loss = module.model_step(batch)
    attention_logits, statistics_logits = step.head_logits
    torch.testing.assert_close(step.output.logits, attention_logits + statistics_logits)
    expected = sum(torch.nn.functional.cross_entropy(logits, batch["labels"])
                   for logits in (step.output.logits, attention_logits, statistics_logits))
    torch.testing.assert_close(loss, expected)


class PlainHead(StatisticsHead):
    """A mode added by a test: trained with the network through the combined logits only (no loss of its own)."""

    name = "plain"


def test_a_new_statistics_head_is_one_class_and_its_registration(monkeypatch):
    with pytest.raises(ValueError, match=r"model\.statistics_head must be one of \('none', 'joint', 'logistic', 'stacked'\), got 'plain'"):
        make_module(statistics_head="plain")
    monkeypatch.setitem(HEADS, PlainHead.name, PlainHead)
    module = make_module(statistics_head="plain", mixup_alpha=0.4)
    batch = fake_batch()
    step, loss = module.model_step(batch)
    attention_logits, statistics_logits = step.head_logits
    torch.testing.assert_close(step.output.logits, attention_logits + statistics_logits)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(step.output.logits, batch["labels"],
                                                                       weight=module.class_weights))
    torch.manual_seed(0)
    module.training_step(batch, 0).backward()  # mixup: its logits join the mixed ones, and it learns from them
    assert module.statistics_head.linear.weight.grad.abs().sum() > 0


def test_speaker_normalisation_needs_the_speaker_statistics():
    module = make_module(normalization="speaker").eval()
    batch = fake_batch()
    with pytest.raises(ValueError, match="speaker_stats"):
        module(batch["features"], batch["lengths"])
    shifted = batch["speaker_stats"].clone()
    shifted[:, 0] += 1.0  # each utterance's speaker mean moves with its features: same normalised input
    with torch.no_grad():
        torch.testing.assert_close(module(batch["features"] + 1.0 * (batch["features"] != 0), batch["lengths"], shifted).logits,
                                   module(batch["features"], batch["lengths"], batch["speaker_stats"]).logits)


def test_class_weights_from_counts():
    weights = class_weights_from_counts(torch.tensor([10, 20, 0, 10]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.5, 0.0, 1.0]))


def test_setup_fills_buffers_from_the_datamodule_and_warns_on_missing_classes():
    module = make_module(statistics_head="logistic")
    datamodule = TinyDataModule()
    datamodule.class_counts = lambda split: torch.tensor([6, 0, 18])
    module._trainer = types.SimpleNamespace(datamodule=datamodule)
    with pytest.warns(UserWarning, match="no training examples of \\['happy'\\]"):
        module.setup("fit")
    mean, std = datamodule.feature_stats
    torch.testing.assert_close(module.feature_mean, mean)
    torch.testing.assert_close(module.feature_std, std)
    torch.testing.assert_close(module.class_weights, torch.tensor([24 / 18, 0.0, 24 / 54]))
    assert module.statistics_head.std.shape == (3 * NUM_FEATURES + 2,) and (module.statistics_head.std > 0).all()


def test_logistic_statistics_head_is_the_validation_chosen_regression_and_stays_frozen():
    from ser_lightning.models.logistic import fit_logistic

    module = make_module(statistics_head="logistic")
    datamodule = TinyDataModule()
    module._trainer = types.SimpleNamespace(datamodule=datamodule)
    module.setup("fit")
    rows = {split: module._statistics_rows(datamodule.utterances_of(split)) for split in ("train", "val")}
    head = module.statistics_head
    torch.testing.assert_close(head.mean, rows["train"].mean(0))
    standard = {split: ((r - head.mean) / head.std).double().numpy() for split, r in rows.items()}
    expected = fit_logistic(standard["train"], datamodule.labels_of("train"), standard["val"], datamodule.labels_of("val"),
                            scaled=True)
    torch.testing.assert_close(head.linear.weight, torch.as_tensor(expected.coef_).float())
    assert not any(p.requires_grad for p in head.parameters())
    batch = fake_batch()
    step, loss = module.model_step(batch)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(step.output.logits, batch["labels"],
                                                                       weight=module.class_weights))


@pytest.mark.parametrize(("head", "residual"), [("logistic", True), ("stacked", False)])
def test_a_frozen_heads_network_trains_on_the_heads_residual_or_on_its_own_logits(head, residual):
    """``logistic``: the network's training loss is on the sum of both heads' logits (it learns what the head leaves);
    ``stacked``: on its own logits (with and without mixup). Evaluated, both add the head's logits to the network's."""
    module = make_module(statistics_head=head)
    module._trainer = types.SimpleNamespace(datamodule=TinyDataModule())
    module.setup("fit")
    batch = fake_batch()
    torch.manual_seed(0)
    step, loss = module.train().model_step(batch)
    attention_logits, statistics_logits = step.head_logits
    target = attention_logits + statistics_logits if residual else attention_logits
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(target, batch["labels"], weight=module.class_weights))
    assert hasattr(module.statistics_head, "offsets") == residual  # cross-fitted logits only for residual training
    module.hparams.mixup_alpha = 0.4
    torch.manual_seed(0)
    mixed, _ = module._mixup_step(batch)
    assert len(mixed.head_logits) == (2 if residual else 1)
    step, _ = module.eval().model_step(batch)
    torch.testing.assert_close(step.output.logits, step.head_logits[0] + step.head_logits[1])


@pytest.mark.parametrize(
    "options, option_name",
    [
        ({"lam": 0.0}, "model.lam"),
        ({"arch": "resnet"}, "model.arch"),
        ({"width": 0.0}, "model.width"),
        ({"num_classes": 1, "class_names": None}, "model.num_classes"),
        ({"class_names": ["a", "b"]}, "model.class_names"),
        ({"normalization": "batch"}, "model.normalization"),
        ({"backend": "triton"}, "model.backend"),
        ({"lr": 0.0}, "model.lr"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"mixup_alpha": -1.0}, "model.mixup_alpha"),
        ({"lr_schedule": "step"}, "model.lr_schedule"),
        ({"attention_dim": 0}, "model.attention_dim"),
        ({"arch": "zhang2d", "num_features": 8}, "zhang2d needs at least"),
        ({"statistics_c": "test"}, "model.statistics_c"),
        ({"statistics_head": "logistic", "statistics": ["pooled", "voiced"], "pitch_rows": False},
         "prosodic, voiced read the pitch rows: set data.feature.pitch true"),
    ],
)
def test_invalid_options_raise_naming_the_option(options, option_name):
    with pytest.raises(ValueError, match=option_name.replace(".", "\\.")):
        make_module(**options)


@pytest.mark.parametrize("normalization", ["global", "speaker", "utterance", "none"])
def test_module_forward_is_batch_independent_in_every_normalization_mode(normalization):
    torch.manual_seed(4)
    module = make_module(normalization=normalization, statistics_head="joint").eval()
    module.feature_mean.fill_(5.0)
    module.feature_std.fill_(2.0)
    batch = fake_batch()
    stats = batch["speaker_stats"] if normalization == "speaker" else None
    with torch.no_grad():
        together = module(batch["features"] * 3 + 4, batch["lengths"], stats).logits
        for i, n in enumerate(batch["lengths"].tolist()):
            one = None if stats is None else stats[i : i + 1]
            alone = module(batch["features"][i : i + 1, :, :n] * 3 + 4, batch["lengths"][i : i + 1], one).logits
            torch.testing.assert_close(together[i], alone[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- fit and test
def test_fit_and_test_reports_the_chosen_checkpoint_on_both_splits(tmp_path):
    lightning.seed_everything(0, workers=True)
    datamodule = TinyDataModule()
    module = make_module(lr=3e-3, lr_schedule="cosine", weight_decay=0.01)
    fit_trainer = trainer(tmp_path, max_epochs=3, enable_checkpointing=True, logger=TensorBoardLogger(tmp_path))
    outcome = fit_and_test(fit_trainer, module, datamodule)
    metrics = fit_trainer.callback_metrics  # the last loop's: the test loop
    assert outcome.test.metrics == {name: pytest.approx(float(metrics[f"test/{name}"])) for name in ("WA", "UA", "F1")}
    assert outcome.best_checkpoint.endswith(".ckpt") and f"valUA{outcome.best_val_UA:.4f}" in outcome.best_checkpoint
    assert outcome.val.metrics["UA"] == pytest.approx(outcome.best_val_UA, abs=1e-6)  # same checkpoint re-evaluated
    assert sum(map(sum, outcome.test.confusion)) == 9 and len(outcome.test_predictions.index) == 9
    recall = [row[k] / sum(row) for k, row in enumerate(outcome.test.confusion)]
    assert outcome.test.metrics["UA"] == pytest.approx(sum(recall) / 3, abs=1e-6)
    assert sorted(outcome.test_predictions.index.tolist()) == list(range(33, 42))
    batches = fit_trainer.predict(module, datamodule=datamodule)
    assert sum(len(b["index"]) for b in batches) == 9 and all(b["probabilities"].shape[1] == 3 for b in batches)


def test_figures_are_drawn_every_n_epochs_and_at_the_end_only(tmp_path):
    lightning.seed_everything(0, workers=True)
    logger = TensorBoardLogger(tmp_path, name="tb")
    logged: list[tuple[str, int]] = []
    drawn: dict[tuple[str, int], Figure] = {}
    writer = logger.experiment
    original = writer.add_figure

    def add_figure(tag, figure, global_step=None, **kwargs):
        logged.append((tag, global_step))
        drawn[tag, global_step] = figure
        return original(tag, figure, global_step=global_step, close=False)

    writer.add_figure = add_figure
    module = make_module(early_stopping_patience=10)
    datamodule = TinyDataModule()
    fit_trainer = trainer(tmp_path, logger=logger, enable_checkpointing=True, max_epochs=5,
                          callbacks=[FigureCallback(every_n_epochs=2, num_attention_maps=2)])
    fit_trainer.fit(module, datamodule=datamodule)
    steps = sorted({step for _, step in logged})
    assert steps == [10, 20, 25]  # after epochs 2 and 4 (5 steps each), and after the last; none in the sanity check
    assert [tag for tag, step in logged if step == 25] == ["val/confusion_matrix", "val/attention_0", "val/attention_1"]
    for step, epoch in ((10, 1), (20, 3), (25, 4)):  # a confusion matrix of every validation utterance, by class
        matrix = drawn["val/confusion_matrix", step].axes[0]
        assert matrix.get_title() == f"validation, epoch {epoch}"
        assert [label.get_text() for label in matrix.get_yticklabels()] == CLASS_NAMES
        counts = [int(text.get_text().split("(")[1].rstrip(")")) for text in matrix.texts]
        assert sum(counts) == 9 and [sum(counts[3 * k : 3 * k + 3]) for k in range(3)] == [3, 3, 3]
    for row, item in enumerate(datamodule.splits["val"][:2]):  # the first validation utterances, as they were given
        top, bottom = drawn[f"val/attention_{row}", 25].axes
        assert top.get_title().startswith(f"val utterance {row} (true {CLASS_NAMES[item['label']]})")
        image, frames = np.asarray(top.images[0].get_array()), item["features"].shape[1]
        assert image.shape == (NUM_FEATURES, max(frames, module.model.min_input_frames))  # short clips: zero-padded
        assert np.array_equal(image[:, :frames], item["features"].numpy()) and not image[:, frames:].any()
        assert bottom.patches[0].get_data().values.sum() == pytest.approx(1.0, abs=1e-5)  # the attention weights
    checkpoints = sorted(p.name for p in (tmp_path / "tb" / "version_0" / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and sum(name.startswith("epoch") for name in checkpoints) == 1


@pytest.mark.parametrize("interval, expected", [(0.0, [1, 2, 3, 4, 5, 6]), (0.25, [1, 4, 6]), (10.0, [1, 6])])
def test_progress_bar_redraws_at_most_every_interval_and_at_the_loop_end(interval, expected, monkeypatch):
    """Batches end every 0.1 s; the bar draws the first, then only after `interval`, and always the last (6 of 6)."""
    clock = iter([0.1 * k for k in range(1, 7)])
    monkeypatch.setattr("ser_lightning.callbacks.time.monotonic", lambda: next(clock))
    bar = ThrottledProgressBar(min_interval_s=interval)
    bar._enabled = True
    assert [n for n in range(1, 7) if bar._should_update(n, 6)] == expected
    with pytest.raises(ValueError, match="min_interval_s"):
        ThrottledProgressBar(min_interval_s=-1)


def test_lightning_asks_the_throttled_bar_before_every_redraw(tmp_path, monkeypatch):
    """The throttle hooks a method Lightning's tqdm bar consults after each batch: a fit must go through it."""
    asked: list[tuple[int, int, bool]] = []
    should_update = ThrottledProgressBar._should_update

    def recording(self, current, total):
        asked.append((current, total, should_update(self, current, total)))
        return asked[-1][2]

    monkeypatch.setattr(ThrottledProgressBar, "_should_update", recording)
    bar = ThrottledProgressBar(min_interval_s=1e9)
    trainer(tmp_path, enable_progress_bar=True, callbacks=[bar], num_sanity_val_steps=0).fit(make_module(), datamodule=TinyDataModule())
    training = [(current, drawn) for current, total, drawn in asked if total == 5]  # 24 utterances, batches of 5
    assert training == [(1, True), (2, False), (3, False), (4, False), (5, True)]  # the first, then the end


def test_fit_in_bf16_mixed_precision(tmp_path):
    lightning.seed_everything(0, workers=True)
    module = make_module(backend="auto", statistics_head="logistic")
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
