"""Attention FCNs (``seed1d``, ``zhang2d``), their layers and the LightningModule
(``module.SERModule``). This package imports nothing itself; import the modules you need."""
