"""Studies of many runs: ``cv`` and ``tune``, their plan and output folder, the executors that run them, and the
report."""
