"""CREMA-D, TESS, SAVEE, EmoDB and CSV-manifest loaders, per-corpus folds and cross-corpus runs."""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import failing_command, tiny_args

from ser_lightning.cli import main
from ser_lightning.data.corpora import CORPORA, corpus_classes, scan_corpus
from ser_lightning.data.cremad import parse_cremad_name
from ser_lightning.data.datamodule import SERDataModule
from ser_lightning.data.emodb import parse_emodb_name
from ser_lightning.normalization import feature_stats
from ser_lightning.data.folds import SplitConfig, make_fold_plan
from ser_lightning.data.manifest import scan_manifest
from ser_lightning.data.records import DEFAULT_EMOTIONS, EMOTIONS, CorpusError
from ser_lightning.data.savee import parse_savee_name
from ser_lightning.data.synth import LAYOUTS, synthesize_corpus
from ser_lightning.data.tess import parse_tess_name

SPEAKERS = {"ravdess": 6, "cremad": 6, "tess": 2, "savee": 4, "emodb": 6, "manifest": 6, "emobox": 6}


def root_of(corpus_dir: Path, layout: str) -> Path:
    return corpus_dir / "manifest.csv" if layout == "manifest" else corpus_dir


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """Every layout, four default emotions, a handful of speakers each."""
    base = tmp_path_factory.mktemp("layouts")
    for layout in LAYOUTS:
        synthesize_corpus(base / layout, layout=layout, actors=SPEAKERS[layout], emotions=DEFAULT_EMOTIONS)
    return {layout: root_of(base / layout, layout) for layout in LAYOUTS}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("1001_DFA_ANG_XX.wav", {"actor": 1001, "sentence": "DFA", "emotion": "angry", "level": "unspecified"}),
        ("1091_IEO_HAP_HI.wav", {"actor": 1091, "sentence": "IEO", "emotion": "happy", "level": "high"}),
        ("1045_TSI_FEA_LO.wav", {"actor": 1045, "sentence": "TSI", "emotion": "fearful", "level": "low"}),
    ],
)
def test_cremad_names(name, expected):
    assert expected.items() <= asdict(parse_cremad_name(name)).items()


@pytest.mark.parametrize(
    "path, speaker, word, emotion",
    [
        ("OAF_angry/OAF_back_angry.wav", "OAF", "back", "angry"),
        ("YAF_pleasant_surprised/YAF_bar_ps.wav", "YAF", "bar", "surprised"),
        ("OAF_Pleasant_surprise/OAF_base_ps.wav", "OAF", "base", "surprised"),
        ("YAF_fear/YAF_germ_ fear.wav", "YAF", "germ", "fearful"),
        ("flat/yaf_Back_Pleasant_Surprised.wav", "YAF", "back", "surprised"),
    ],
)
def test_tess_names_and_variants(path, speaker, word, emotion):
    name = parse_tess_name(path)
    assert (name.speaker, name.word, name.emotion) == (speaker, word, emotion)


@pytest.mark.parametrize(
    "path, speaker, emotion, sentence",
    [("DC_a01.wav", "DC", "angry", 1), ("KL/su15.wav", "KL", "surprised", 15), ("x/JE_n30.wav", "JE", "neutral", 30),
     ("JK/sa02.wav", "JK", "sad", 2)],
)
def test_savee_names_with_prefix_or_folder(path, speaker, emotion, sentence):
    name = parse_savee_name(path)
    assert (name.speaker, name.emotion, name.sentence) == (speaker, emotion, sentence)


def test_emodb_names():
    name = parse_emodb_name("wav/03a01Wa.wav")
    assert (name.speaker, name.text, name.emotion, name.version, name.sex) == ("03", "a01", "angry", "a", "male")
    assert parse_emodb_name("16b10Tb.wav").sex == "female"


@pytest.mark.parametrize(
    "parse, name, reason",
    [
        (parse_cremad_name, "1001_DFA_ANG.wav", "not a CREMA-D name"),
        (parse_cremad_name, "0999_DFA_ANG_XX.wav", "1001-1091"),
        (parse_cremad_name, "1001_XYZ_ANG_XX.wav", "sentence code 'XYZ'"),
        (parse_cremad_name, "1001_DFA_CAL_XX.wav", "emotion code 'CAL'"),
        (parse_cremad_name, "1001_DFA_ANG_ZZ.wav", "level code 'ZZ'"),
        (parse_tess_name, "OAF_back.wav", "not a TESS name"),
        (parse_tess_name, "OAF_back_calm.wav", "not a TESS name"),
        (parse_tess_name, "MAF_back_angry.wav", "speaker 'MAF'"),
        (parse_tess_name, "OAF_sad/OAF_back_angry.wav", "disagrees"),
        (parse_savee_name, "DC_x01.wav", "emotion code 'x'"),
        (parse_savee_name, "XY_a01.wav", "speaker prefix 'XY'"),
        (parse_savee_name, "audio/a01.wav", "speaker folder 'AUDIO'"),
        (parse_savee_name, "DC_a16.wav", "outside 01-15"),
        (parse_savee_name, "DC_anger.wav", "not a SAVEE name"),
        (parse_emodb_name, "03a01F.wav", "not an EmoDB name"),
        (parse_emodb_name, "04a01Fa.wav", "speaker '04'"),
        (parse_emodb_name, "03a01Xa.wav", "emotion letter 'X'"),
    ],
)
def test_malformed_names_name_the_file(parse, name, reason):
    with pytest.raises(CorpusError, match=reason) as error:
        parse(name)
    assert Path(name).name in str(error.value)


def test_every_synthetic_layout_scans_end_to_end(layouts):
    for layout, root in layouts.items():
        result = scan_corpus(layout, root, DEFAULT_EMOTIONS)
        utterances = result.utterances
        assert not result.skipped and {u.corpus for u in utterances} == {layout}
        assert {u.emotion for u in utterances} == set(DEFAULT_EMOTIONS)
        assert len({u.speaker for u in utterances}) == SPEAKERS[layout]
        assert all(u.path.is_file() for u in utterances)
    tess = scan_corpus("tess", layouts["tess"], EMOTIONS).utterances
    assert {u.speaker for u in tess} == {"OAF", "YAF"} and {u.sex for u in tess} == {"female"}
    assert {u.sex for u in scan_corpus("savee", layouts["savee"], DEFAULT_EMOTIONS).utterances} == {"male"}
    assert {u.sex for u in scan_corpus("emodb", layouts["emodb"], DEFAULT_EMOTIONS).utterances} == {"male", "female"}


def test_cremad_sex_comes_from_the_demographics_file_only(layouts, tmp_path):
    with_csv = scan_corpus("cremad", layouts["cremad"], DEFAULT_EMOTIONS).utterances
    assert {(u.speaker, u.sex) for u in with_csv if u.speaker in ("1001", "1002")} == {("1001", "male"), ("1002", "female")}
    audio_only = shutil.copytree(layouts["cremad"] / "AudioWAV", tmp_path / "AudioWAV")
    assert {u.sex for u in scan_corpus("cremad", audio_only, DEFAULT_EMOTIONS).utterances} == {None}
    (tmp_path / "VideoDemographics.csv").write_text("ActorID,Sex\n1001,X\n")  # found in the parent folder
    with pytest.raises(CorpusError, match="VideoDemographics.csv line 2"):
        scan_corpus("cremad", audio_only, DEFAULT_EMOTIONS)


def test_emodb_boredom_is_skipped_and_counted(layouts, tmp_path):
    root = shutil.copytree(layouts["emodb"], tmp_path / "emodb")
    source = next((root / "wav").glob("03a01Wa.wav"))
    for name in ("03a01La.wav", "08b01Lb.wav"):
        shutil.copy(source, root / "wav" / name)
    result = scan_corpus("emodb", root, DEFAULT_EMOTIONS)
    assert len(result.skipped) == 2 and all("boredom (L)" in reason for _, reason, _ in result.skipped)
    assert len(result.utterances) == len(scan_corpus("emodb", layouts["emodb"], DEFAULT_EMOTIONS).utterances)


def test_malformed_file_is_an_error_or_skipped_when_lenient(layouts, tmp_path):
    root = shutil.copytree(layouts["savee"], tmp_path / "savee")
    shutil.copy(next((root / "DC").glob("*.wav")), root / "DC" / "x01.wav")
    with pytest.raises(CorpusError, match=r"x01\.wav.*data\.lenient"):
        scan_corpus("savee", root, DEFAULT_EMOTIONS)
    result = scan_corpus("savee", root, DEFAULT_EMOTIONS, lenient=True)
    assert [p.name for p, _, _ in result.skipped] == ["x01.wav"]


def write_manifest(folder: Path, lines: list[str]) -> Path:
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_resolves_paths_and_keeps_extra_columns(tmp_path):
    (tmp_path / "clips").mkdir()
    for name in ("a.wav", "b.wav"):
        (tmp_path / "clips" / name).write_bytes(b"")
    manifest = write_manifest(tmp_path, [
        "path,Label,speaker,sex,session", "clips/a.wav,HAPPY,s1,F,one", f"{tmp_path / 'clips' / 'b.wav'},sad,s2,,two",
    ])
    a, b = scan_manifest(manifest, EMOTIONS).utterances
    assert (a.path, a.emotion, a.speaker, a.sex, dict(a.fields)) == (
        (tmp_path / "clips" / "a.wav").resolve(), "happy", "s1", "female", {"session": "one"})
    assert (b.emotion, b.sex) == ("sad", None)
    assert corpus_classes("manifest", manifest) == ("happy", "sad")


def test_manifest_reports_every_problem_with_its_line(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "b.wav").write_bytes(b"")
    manifest = write_manifest(tmp_path, [
        "path,label,speaker",
        "a.wav,happy,s1",
        "missing.wav,sad,s1",
        "a.wav,sad,s2",
        "b.wav,joy,s2",
        "b.wav,angry,",
    ])
    with pytest.raises(CorpusError) as error:
        scan_manifest(manifest, EMOTIONS)
    message = str(error.value)
    assert "4 bad row(s)" in message and "data.lenient" in message
    assert "line 3: file 'missing.wav' not found" in message
    assert "line 4: duplicate path 'a.wav' (first listed on line 2)" in message
    assert "line 5: unknown label 'joy'" in message
    assert "line 6: empty speaker" in message
    result = scan_manifest(manifest, EMOTIONS, lenient=True)
    assert [u.path.name for u in result.utterances] == ["a.wav"] and len(result.skipped) == 4
    with pytest.raises(CorpusError, match=r"missing column\(s\) \['speaker'\]"):
        scan_manifest(write_manifest(tmp_path, ["path,label", "a.wav,happy"]), EMOTIONS)


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "tess"])
def test_speaker_independent_folds_per_corpus(layouts, layout):
    utterances = scan_corpus(layout, layouts[layout], DEFAULT_EMOTIONS).utterances
    num_folds = min(3, SPEAKERS[layout] - 1)
    tested = set()
    for fold in range(num_folds):
        plan = make_fold_plan(utterances, DEFAULT_EMOTIONS, SplitConfig(num_folds=num_folds, fold=fold, num_val_speakers=1))
        train, val, test = (set(getattr(plan, f"{s}_speakers")) for s in ("train", "val", "test"))
        assert train and val and test and not (train & val or train & test or val & test)
        assert sorted(plan.train + plan.val + plan.test) == list(range(len(utterances)))
        tested |= test
    assert tested == {u.speaker for u in utterances}


def make_dm(root, corpus, cache, **kwargs) -> SERDataModule:
    args = {"num_folds": 2, "num_val_speakers": 1, "batch_size": 8, "cache_dir": str(cache)} | kwargs
    return SERDataModule(root=str(root), corpus=corpus, **args)


def test_corpus_options_are_validated(layouts, tmp_path):
    with pytest.raises(ValueError, match=r"data.emotions: CREMA-D has no \['calm'\]; its classes are"):
        make_dm(layouts["cremad"], "cremad", tmp_path, emotions=["calm", "sad"])
    assert make_dm(layouts["cremad"], "cremad", tmp_path, emotions="all").class_names == list(CORPORA["cremad"].classes)
    for kwargs, option in [
        ({"corpus": "iemocap"}, "data.corpus"), ({"test_corpus": "iemocap", "test_root": "."}, "data.test_corpus"),
        ({"test_corpus": "tess"}, "data.test_root"), ({"test_root": str(tmp_path / "nowhere")}, "data.test_root"),
        ({"root": str(layouts["cremad"])}, "data.root"),  # a folder where a CSV file is expected
    ]:
        with pytest.raises(ValueError, match=option):
            SERDataModule(**({"root": str(layouts["manifest"]), "corpus": "manifest"} | kwargs))
    with pytest.raises(ValueError, match="data.root: corpus 'savee' needs data.root"):
        SERDataModule(corpus="savee")


def test_tess_refuses_more_folds_than_speakers(layouts, tmp_path):
    for num_folds in (3, 2):
        dm = make_dm(layouts["tess"], "tess", tmp_path, num_folds=num_folds)
        with pytest.raises(ValueError, match=rf"data.num_folds={num_folds}.*only 2 speakers.*data.protocol=random"):
            dm.setup()
    dm = make_dm(layouts["tess"], "tess", tmp_path, protocol="random")
    dm.setup()
    assert dm.fold_plan.speaker_dependent and len(dm.fold_plan.test) > 0


def test_cross_corpus_datamodule_intersects_classes(layouts, tmp_path):
    synthesize_corpus(tmp_path / "ravdess8", actors=3, emotions=EMOTIONS)  # all eight classes
    with pytest.warns(UserWarning, match=r"has no \['calm', 'surprised'\]"):
        dm = SERDataModule(
            root=str(tmp_path / "ravdess8"), emotions="all", test_corpus="emodb", test_root=str(layouts["emodb"]),
            cache_dir=str(tmp_path), num_val_speakers=1,
        )
    assert dm.class_names == ["neutral", "happy", "sad", "angry", "fearful", "disgust"]
    dm.setup()
    plan = dm.fold_plan
    test = [dm.utterances[i] for i in plan.test]
    assert {u.corpus for u in test} == {"emodb"} and len(test) == len(scan_corpus("emodb", layouts["emodb"], EMOTIONS).utterances)
    assert {dm.utterances[i].corpus for i in plan.train + plan.val} == {"ravdess"}
    assert len(plan.val_speakers) == 1 and len(plan.train_speakers) == 2
    assert dm.class_counts("test").tolist() == [3 * 6] * 4 + [0, 0]  # the emodb layout above has four emotions
    mean, _ = dm.feature_stats
    assert torch.equal(mean, feature_stats([dm.features[i] for i in plan.train])[0])


def test_cross_corpus_fit_and_test_through_the_cli(layouts, tmp_path, capsys):
    main(["fit", *tiny_args(layouts["cremad"], tmp_path, "--data.corpus=cremad", f"--data.test_root={layouts['tess']}",
                            "--data.test_corpus=tess")])
    out = capsys.readouterr().out
    assert "validation: WA" in out and "test: WA" in out
    config = (tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert "test_corpus: tess" in config


def test_synth_command_writes_other_layouts(tmp_path, capsys):
    main(["synth", str(tmp_path / "savee"), "--layout=savee", "--actors=1", "--emotions=neutral,angry,calm"])
    assert sorted(p.name for p in (tmp_path / "savee" / "DC").glob("*.wav")) == [
        "a01.wav", "a02.wav", "a03.wav", "n01.wav", "n02.wav", "n03.wav"]
    status, err = failing_command(["synth", str(tmp_path / "tess"), "--layout=tess", "--actors=3"], capsys)
    assert status == 2 and err == "error: actors: the tess layout takes 1 to 2 speakers, got 3\n"
    assert not list(tmp_path.glob("*tess*"))  # no partial corpus, no temporary folder
