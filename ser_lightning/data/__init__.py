"""Data pipeline: corpora (one module each, registered in ``corpora``), audio decoding, features,
the feature cache, fold plans, batches and the DataModule. Import the modules you need; this package
imports nothing itself, so that light modules (``records``, the corpus parsers) stay light."""
