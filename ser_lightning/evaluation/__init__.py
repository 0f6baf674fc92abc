"""Cross-validation driver and reports."""
