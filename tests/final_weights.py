"""A callback that the end-to-end tests add to runs (``conftest.FINAL_WEIGHTS``); a module of its own so that a run
in another process finds it (tests/ on its PYTHONPATH) and conftest.py stays free of heavy imports."""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback


class FinalWeights(Callback):
    """Saves the model's weights as ``final.pt`` in the run's log folder when fitting ends, to compare runs."""

    def on_train_end(self, trainer, module) -> None:
        torch.save(module.state_dict(), Path(trainer.log_dir) / "final.pt")
