"""Attention FCNs for speech emotion recognition and the LightningModule that trains them."""

from ser_lightning.models.attention import AttentionPool
from ser_lightning.models.layers import ModelOutput, conv_output_length
from ser_lightning.models.module import SERModule
from ser_lightning.models.seed1d import Seed1D
from ser_lightning.models.zhang2d import Zhang2D

__all__ = ["AttentionPool", "ModelOutput", "SERModule", "Seed1D", "Zhang2D", "conv_output_length"]
