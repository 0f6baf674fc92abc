"""Studies: parallel executors (worker processes, Ray) and the nested hyper-parameter search."""

import json
import math
from functools import reduce
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_args
from trial_worker import report_and_ask

from ser_lightning.cli import main
from ser_lightning.errors import UsageError
from ser_lightning.studies.executors import ExecutorOptions, open_executor
from ser_lightning.studies.tune import load_space

SHIPPED_SPACES = sorted((Path(__file__).resolve().parents[1] / "configs" / "spaces").glob("*.yaml"))

SPACE = "model.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\nmodel.width: {type: categorical, choices: [1.0, 2.0]}\n"


def study_args(command: str, corpus: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [command, "--folds=3", "--only=0,1", f"--out={out}",
            *tiny_args(corpus, out.parent, "--figures.every_n_epochs=0", "--figures.num_attention_maps=0",
                       "--baseline=false", cache=cache), *extra]


def fold_results(out: Path) -> list[tuple]:
    results = [json.loads(path.read_text()) for path in sorted(out.glob("fold_*/result.json"))]
    return [(r["fold"], r["metrics"], r["confusion_matrix"], r["test_probabilities"]) for r in results]


@pytest.fixture(scope="module")
def local_study(tiny_corpus, feature_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    main(study_args("cv", tiny_corpus, out, feature_cache))
    return out


@pytest.mark.slow
def test_worker_processes_give_the_local_results(local_study, tiny_corpus, feature_cache, tmp_path, capsys):
    """Two folds on two spawned workers at once (the strictest executor: its tasks cross by pickle)."""
    out = tmp_path / "out"
    threads = f"--threads_per_worker={torch.get_num_threads()}"  # as many as the local run: the same sums
    main(study_args("cv", tiny_corpus, out, feature_cache, "--executor=processes", "--workers=2", threads))
    assert fold_results(out) == fold_results(local_study)  # same seeds, same numbers, wherever they ran
    printed = capsys.readouterr().out
    assert "[study] 2 run(s) submitted" in printed and "2/2 done, 0 running, 0 failed" in printed
    main(study_args("cv", tiny_corpus, out, feature_cache, "--executor=processes"))  # a rerun skips both
    assert printed.count("complete, skipped") == 0 and capsys.readouterr().out.count("complete, skipped") == 2


@pytest.mark.slow
def test_ray_tasks_return_their_results_and_their_errors():
    """The Ray executor behind the same interface (a study's folds go through it as through the processes one,
    which holds them to pickle; Ray's cloudpickle takes more), on a private local Ray instance."""
    with open_executor(ExecutorOptions("ray", workers=1)) as executor:
        executor.submit("fine", math.hypot, 3.0, 4.0)
        executor.submit("broken", math.sqrt, -1.0)
        assert executor.busy == 2
        ended = {e.key: e for e in (executor.next_finished(), executor.next_finished())}
    assert (ended["fine"].result, ended["fine"].error) == (5.0, None)
    assert "math domain error" in str(ended["broken"].error)


def test_a_trial_sent_to_a_worker_process_reports_to_its_study(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    trials = [study.ask() for _ in range(2)]
    with open_executor(ExecutorOptions("processes", workers=1)) as executor:
        for value, trial in zip((0.25, 0.5), trials):
            executor.submit(trial, report_and_ask, trial, value)
        ended = [executor.next_finished() for _ in trials]
    assert {e.key.number: (e.result, e.error) for e in ended} == {0: ((0, False), None), 1: ((1, False), None)}
    reported = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.intermediate_values for t in reported] == [{0: 0.25}, {0: 0.5}]


@pytest.mark.parametrize("space", SHIPPED_SPACES, ids=lambda path: path.stem)
def test_shipped_spaces_set_options_of_the_configuration_they_are_named_after(space, capsys):
    params = load_space(space)
    values = {p.name: p.choices[-1] if p.kind == "categorical" else p.high for p in params}
    with pytest.raises(SystemExit):
        main(["fit", "--config", space.stem, *(f"--{name}={value}" for name, value in values.items()), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {name: reduce(dict.__getitem__, name.split("."), printed) for name in values} == values


def test_space_files_are_validated(tmp_path):
    from ser_lightning.studies.tune import load_space

    for text, problem in [("model.lr: {type: float, low: 1, high: 0}", "'low' < 'high'"),
                          ("model.lr: {type: gaussian}", "'type' must be"),
                          ("model.lr: {type: float, low: 0, high: 1, log: true}", "log-scaled"),
                          ("model.width: {type: categorical, choices: []}", "choices")]:
        (tmp_path / "space.yaml").write_text(text)
        with pytest.raises(UsageError, match=problem):
            load_space(tmp_path / "space.yaml")


@pytest.mark.slow
def test_nested_search_never_shows_a_trial_the_outer_test_speakers_and_resumes(tiny_corpus, feature_cache, tmp_path,
                                                                              capsys):
    import optuna

    (tmp_path / "space.yaml").write_text(SPACE)
    out = tmp_path / "out"
    args = study_args("tune", tiny_corpus, out, feature_cache, f"--space={tmp_path / 'space.yaml'}", "--trials=2")
    main(args)
    report = (out / "tune_report.md").read_text()
    assert "No test fold took part in any choice" in report
    for fold in (0, 1):
        trials = [json.loads(p.read_text()) for p in (out / f"outer_fold_{fold}").glob("trial_*/trial.json")]
        assert len(trials) == 2
        result = json.loads((out / f"fold_{fold}" / "result.json").read_text())
        for trial in trials:
            assert trial["outer_test_speakers"] == result["test_speakers"]
            assert not set(result["test_speakers"]) & (set(trial["train_speakers"]) | set(trial["val_speakers"]))
        chosen = json.loads((out / f"fold_{fold}" / "chosen.json").read_text())
        assert result["tuned"] == chosen["params"]  # the final run used the chosen hyper-parameters

    # a search stopped in the middle of a trial: that trial is failed and replaced, finished ones are kept
    (out / "fold_1" / "result.json").unlink()
    storage = f"sqlite:///{out / 'outer_fold_1' / 'study.db'}"
    study = optuna.load_study(study_name="outer_fold_1", storage=storage)
    study.ask()  # left RUNNING, as a killed search leaves it
    capsys.readouterr()
    main([*args[:-1], "--trials=3"])
    printed = capsys.readouterr().out
    assert "outer fold 0: complete, skipped" in printed and "outer fold 1: 2/3 trials done" in printed
    states = [t.state for t in optuna.load_study(study_name="outer_fold_1", storage=storage).trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and len(states) == 4
