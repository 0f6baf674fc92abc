"""Studies know what they are: `cv`/`tune` output folders record their configuration and refuse another one."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import tiny_args

from ser_lightning.cli import main
from ser_lightning.studies.plan import study_settings
from ser_lightning.run.identity import (
    STUDY_FILE, StudyMismatch, StudyRecord, code_version, differences, study_config,
)
from ser_lightning.studies.tune import Param

CHANGED = ("--model.width=2", "--trainer.max_epochs=4")
NAMED = "model.width: 1.0 -> 2.0, trainer.max_epochs: 1 -> 4"


def cv_args(corpus: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["cv", "--folds=3", f"--out={out}", *tiny_args(corpus, out.parent, "--figures.every_n_epochs=0",
                                                           "--figures.num_attention_maps=0", "--baseline=false",
                                                           cache=cache), *extra]


@pytest.fixture(scope="module")
def study(tiny_corpus, feature_cache, tmp_path_factory) -> Path:
    """Fold 0 of a 3-fold study (one epoch), made without the changed options."""
    out = tmp_path_factory.mktemp("study") / "out"
    main(cv_args(tiny_corpus, out, feature_cache, "--only=0"))
    return out


def contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_study_records_its_configuration_and_code_version(study, tiny_corpus):
    record = StudyRecord.from_json((study / STUDY_FILE).read_text(), study / STUDY_FILE)
    assert record.command == "cv" and record.code == code_version() and record.code["sources"]
    assert record.config["model"]["width"] == 1.0 and record.config["trainer"]["max_epochs"] == 1
    assert record.config["data"]["root"] == str(tiny_corpus) and record.config["data"]["num_folds"] == 3
    assert "fold" not in record.config["data"] and "logger" not in record.config["trainer"]  # per run, not per study
    result = json.loads((study / "fold_0" / "result.json").read_text())
    assert result["code"] == record.code


@pytest.mark.parametrize("state", ["complete", "folds missing", "fold partly trained", "no study.json"])
def test_another_configuration_into_the_same_out_is_refused_naming_the_options(state, study, tiny_corpus,
                                                                              feature_cache, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(study, out)
    only = "--only=0" if state == "complete" else "--only=0,1"
    if state == "fold partly trained":  # as a run killed during fold 1 leaves it
        (out / "fold_1" / "run" / "checkpoints").mkdir(parents=True)
        shutil.copy(out / "fold_0" / "run" / "checkpoints" / "last.ckpt", out / "fold_1" / "run" / "checkpoints")
    if state == "no study.json":  # a folder an earlier version made: its runs say what it is
        (out / STUDY_FILE).unlink()
    before = contents(out)
    with pytest.raises(StudyMismatch) as error:
        main(["--debug", *cv_args(tiny_corpus, out, feature_cache, only, *CHANGED)])
    message = str(error.value)
    assert "\n" not in message and f"--out {out}: this study was made with another configuration ({NAMED})" in message
    assert "--new_out" in message
    assert contents(out) == before  # nothing trained, nothing rewritten


def test_new_out_puts_another_configuration_beside_and_cv_report_refuses_to_merge_them(study, tiny_corpus,
                                                                                      feature_cache, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(study, out)
    main(cv_args(tiny_corpus, out, feature_cache, "--only=1", "--new_out", *CHANGED))
    beside = tmp_path / "out-2"
    assert json.loads((beside / "fold_1" / "result.json").read_text())["config"]["model"]["width"] == 2.0
    assert not (out / "fold_1").exists()
    capsys.readouterr()
    main(cv_args(tiny_corpus, out, feature_cache, "--only=1", "--new_out", *CHANGED))  # finds its folder again
    assert "fold 1: complete, skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["cv-report", str(out), str(beside), f"--out={tmp_path / 'merged'}"])
    error = capsys.readouterr().err
    assert re.search(rf"come from different configurations and cannot be merged .*\({NAMED}\)", error), error


def test_tune_refuses_another_search_space_before_any_trial(tiny_corpus, feature_cache, tmp_path):
    (tmp_path / "space.yaml").write_text("model.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    lightning_args = tiny_args(tiny_corpus, tmp_path, cache=feature_cache)
    out = tmp_path / "out"
    out.mkdir()  # a search of the same configuration over a wider range, as tune records it
    wider = {"model.lr": asdict(Param("model.lr", "float", 1e-4, 0.1, log=True))}
    searched = study_config(study_settings(lightning_args, 3).config, ("model.lr",))
    (out / STUDY_FILE).write_text(StudyRecord("tune", searched, space=wider).to_json())
    with pytest.raises(StudyMismatch, match=r"another configuration \(space\.model\.lr\.high: 0\.1 -> 0\.01\)"):
        main(["--debug", "tune", f"--space={tmp_path / 'space.yaml'}", "--trials=1", "--folds=3", f"--out={out}",
              *lightning_args])
    assert sorted(path.name for path in out.iterdir()) == [STUDY_FILE]  # no trial, no study database


@pytest.mark.parametrize("old, new, expected", [
    ({"model": {"width": 1.0}}, {"model": {"width": 2.0}}, ["model.width: 1.0 -> 2.0"]),
    ({"data": {"root": "a"}}, {"data": {"root": "b", "lenient": True}}, ["data.lenient: (unset) -> true",
                                                                         "data.root: a -> b"]),
    ({"trainer": {"callbacks": [1]}}, {"trainer": {"callbacks": [1]}}, []),
])
def test_differences_name_each_dotted_option(old, new, expected):
    assert differences(old, new) == expected
