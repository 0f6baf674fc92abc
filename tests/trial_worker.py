"""What a worker process does with an Optuna trial it was sent (tests/test_studies.py): a module of its own, so
that the spawned worker imports this and not the whole test module with its fixtures."""


def report_and_ask(trial, value: float) -> tuple[int, bool]:
    """Report a validation UA for the trial, ask its pruner."""
    trial.report(value, step=0)
    return trial.number, trial.should_prune()
