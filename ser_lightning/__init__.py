"""ser-lightning: attention-based fully convolutional networks for speech emotion recognition."""

from typing import Any

__all__ = ["EmotionRecognizer"]


def __getattr__(name: str) -> Any:
    """Import heavy parts on first use, so that `import ser_lightning` stays light."""
    if name == "EmotionRecognizer":
        from ser_lightning.inference.recognizer import EmotionRecognizer

        return EmotionRecognizer
    raise AttributeError(f"module 'ser_lightning' has no attribute {name!r}")
