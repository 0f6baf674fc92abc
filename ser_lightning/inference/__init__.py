"""Prediction on new recordings (EmotionRecognizer, the `predict` command) and ONNX export."""

from ser_lightning.inference.recognizer import CheckpointError, EmotionRecognizer, Prediction, WindowPrediction

__all__ = ["CheckpointError", "EmotionRecognizer", "Prediction", "WindowPrediction"]
