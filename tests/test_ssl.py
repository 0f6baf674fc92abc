"""The ssl feature front end with a tiny local wav2vec 2.0: configuration, frames, batching, weights, cache, CLI.

Nothing here downloads: every test runs offline with an empty torch hub cache and a downloader that fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchaudio.pipelines
import yaml
from conftest import TINY_EMOTIONS, tiny_args, train_tiny_checkpoint

import ser_lightning.data.loading as loading_module
import ser_lightning.data.ssl as ssl_module
from ser_lightning.cli import main
from ser_lightning.data.datamodule import SERDataModule
from ser_lightning.data.features import FeatureConfig, FeatureExtractor
from ser_lightning.data.ssl import BUNDLES, SSLExtractor, SSLWeightsError, build_model, resolve_ssl

SSL_CONFIG = Path(__file__).parent / "conf" / "ssl_tiny.yaml"
TINY = yaml.safe_load(SSL_CONFIG.read_text())["data"]["feature"]
TINY_ARCH = TINY["ssl_arch"]
WAVLM_ARCH = TINY_ARCH | {"family": "wavlm", "extractor_mode": "group_norm", "encoder_layer_norm_first": False,
                          "encoder_num_buckets": 32, "encoder_max_distance": 100}


def save_weights(path: Path, arch: dict, seed: int = 0) -> Path:
    """A randomly initialised model of ``arch``, saved as a state dict."""
    torch.manual_seed(seed)
    torch.save(build_model(resolve_ssl("custom", None, str(path), arch)).state_dict(), path)
    return path


def tiny_config(weights: Path, **options) -> FeatureConfig:
    return FeatureConfig(**(TINY | {"ssl_weights": str(weights)} | options))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may reach the network: an empty torch hub cache, offline mode and a downloader that fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(ssl_module.OFFLINE_ENV, "1")

    def no_download(url, destination, progress=True):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(ssl_module, "download_url_to_file", no_download)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    return save_weights(tmp_path_factory.mktemp("ssl_weights") / "tiny_wav2vec2.pt", TINY_ARCH)


@pytest.fixture(scope="module")
def ssl_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ssl_cache")


def ssl_args(weights: Path, cache: Path) -> list[str]:
    return ["--config", str(SSL_CONFIG), f"--data.feature.ssl_weights={weights}", f"--data.cache_dir={cache}",
            "--figures.every_n_epochs=0", "--figures.num_attention_maps=0"]


@pytest.fixture(scope="module")
def ssl_checkpoint(tiny_corpus, tiny_weights, ssl_cache, tmp_path_factory) -> Path:
    """One epoch of `fit` with the tiny ssl front end (the network is not needed: local weights)."""
    with pytest.MonkeyPatch.context() as patch:  # module scope: the autouse fixture is not active yet
        patch.setenv(ssl_module.OFFLINE_ENV, "1")
        patch.setattr(ssl_module, "download_url_to_file", None)
        return train_tiny_checkpoint(tiny_corpus, tmp_path_factory.mktemp("ssl_run"), *ssl_args(tiny_weights, ssl_cache))


def test_bundle_table_matches_torchaudio():
    for name, bundle in BUNDLES.items():
        source = getattr(torchaudio.pipelines, name)
        params = source._params
        assert (bundle.file, bundle.num_layers, bundle.width, bundle.extractor_mode, bundle.normalize_waveform) == (
            source._path, params["encoder_num_layers"], params["encoder_embed_dim"], params["extractor_mode"],
            source._normalize_waveform), name
        assert bundle.family == {"Wav2Vec2": "wav2vec2", "WavLM": "wavlm"}[source._model_type]
        assert [tuple(layer) for layer in params["extractor_conv_layer_config"]] == list(ssl_module.STANDARD_CONV)
        assert source.sample_rate == ssl_module.SAMPLE_RATE


@pytest.mark.parametrize("options, option", [
    ({"ssl_model": "WAVLM_HUGE"}, "data.feature.ssl_model"),
    ({"ssl_layer": 13}, "data.feature.ssl_layer"),  # WAVLM_BASE_PLUS has 12 layers
    ({"ssl_model": "WAVLM_LARGE", "ssl_layer": [0, 24]}, "data.feature.ssl_layer"),
    ({"ssl_layer": [3, 3]}, "data.feature.ssl_layer"),
    ({"ssl_model": "custom"}, "data.feature.ssl_weights"),
    ({"ssl_model": "custom", "ssl_weights": "x.pt"}, "data.feature.ssl_arch"),
    ({"ssl_model": "custom", "ssl_weights": "x.pt", "ssl_arch": TINY_ARCH | {"family": "hubert"}}, "ssl_arch.family"),
    ({"ssl_model": "custom", "ssl_weights": "x.pt", "ssl_arch": TINY_ARCH | {"encoder_heads": 2}}, "encoder_heads"),
    ({"ssl_arch": TINY_ARCH}, "data.feature.ssl_arch: only for ssl_model 'custom'"),
    ({"hop_ms": 10.0}, "data.feature.hop_ms"),
    ({"sample_rate": 8000}, "data.feature.sample_rate"),
    ({"pitch": True}, "data.feature.pitch"),
    ({"name": "logmel", "ssl_layer": 3}, "data.feature.ssl_layer: applies to name: ssl only"),
])
def test_config_errors_name_the_option(options, option):
    with pytest.raises(ValueError, match=option):
        FeatureConfig(**({"name": "ssl"} | options))


def test_tiny_model_gives_20_ms_frames_of_its_width_loaded_once(tiny_weights, monkeypatch):
    monkeypatch.setattr(ssl_module, "_MODELS", {})
    extractor = FeatureExtractor(tiny_config(tiny_weights))
    assert extractor.num_features == 32 and extractor.hop_seconds == pytest.approx(0.020)
    assert not ssl_module._MODELS  # the model loads on first use, not when the extractor is built
    for seconds in (0.01, 1.0, 2.5):  # shorter than the 400-sample receptive field: one frame
        samples = int(seconds * 16000)
        features = extractor(torch.randn(samples))
        assert features.shape == (32, extractor.frames(samples)) == (32, max(1, (samples - 400) // 320 + 1))
    assert extractor.frames(torch.tensor([160, 16000])).tolist() == [1, 49]
    wave = torch.randn(16000)
    one, two = (FeatureExtractor(tiny_config(tiny_weights, ssl_layer=layer))(wave) for layer in (1, 2))
    assert torch.allclose(extractor(wave), (one + two) / 2, atol=1e-6)  # a list of layers is their mean
    assert len(ssl_module._MODELS) == 1  # one model for every extractor of this weights file


@pytest.mark.parametrize("arch, calls", [(TINY_ARCH, 1), (WAVLM_ARCH, 3)])
def test_batched_extraction_equals_one_at_a_time(arch, calls, tmp_path, monkeypatch):
    """Padded batches where the front end allows them (wav2vec2, layer norm), equal-length groups otherwise."""
    extractor = SSLExtractor(resolve_ssl("custom", [1, 2], str(save_weights(tmp_path / "w.pt", arch)), arch), "cpu")
    waves = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (16000, 9000, 16000, 200, 16000)]
    single = [extractor(wave) for wave in waves]
    forward_passes = []
    hidden = extractor._hidden
    monkeypatch.setattr(extractor, "_hidden", lambda batch, lengths: forward_passes.append(len(batch)) or hidden(batch, lengths))
    batched = extractor.extract_many(waves)
    assert len(forward_passes) == calls and sum(forward_passes) == len(waves)
    for alone, together in zip(single, batched):
        assert alone.shape == together.shape
        assert torch.allclose(alone, together, atol=1e-5)


def test_cache_key_follows_model_layers_and_weights_file(tiny_weights, tmp_path):
    copy = tmp_path / "copy.pt"
    copy.write_bytes(tiny_weights.read_bytes())
    key = tiny_config(tiny_weights).key()
    assert key == tiny_config(tiny_weights).key()
    assert key != tiny_config(tiny_weights, ssl_layer=2).key()
    assert key != tiny_config(copy).key()
    before = tiny_config(copy).key()
    save_weights(copy, TINY_ARCH, seed=1)  # other weights in the same file
    assert tiny_config(copy).key() != before
    assert "wavlm_base_plus.pth" in FeatureConfig(name="ssl").key()
    assert FeatureConfig(name="ssl").key() != FeatureConfig(name="ssl", ssl_model="WAVLM_BASE").key()


@pytest.mark.parametrize("case", ["offline", "download_fails", "local_file_missing"])
def test_missing_weights_name_the_file_to_provide(case, tmp_path, monkeypatch):
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / "wavlm_base_plus.pth"
    assert str(tmp_path) in str(hub_file)  # the empty hub cache of this test
    config = FeatureConfig(name="ssl")
    if case == "download_fails":
        monkeypatch.delenv(ssl_module.OFFLINE_ENV)

        def unreachable(url, destination, progress=True):
            raise OSError("Temporary failure in name resolution")

        monkeypatch.setattr(ssl_module, "download_url_to_file", unreachable)
    if case == "local_file_missing":
        hub_file = tmp_path / "nowhere" / "weights.pt"
        config = FeatureConfig(name="ssl", ssl_weights=str(hub_file))
    with pytest.raises(SSLWeightsError) as error:
        FeatureExtractor(config)(torch.zeros(16000))
    message = str(error.value)
    assert str(hub_file) in message
    if case != "local_file_missing":
        assert "data.feature.ssl_weights" in message and "wavlm_base_plus.pth" in message
    assert {"offline": ssl_module.OFFLINE_ENV, "download_fails": "name resolution",
            "local_file_missing": "data.feature.ssl_weights"}[case] in message


def test_a_bundle_file_in_the_hub_cache_is_used_without_downloading():
    spec = FeatureConfig(name="ssl", ssl_model="HUBERT_BASE").resolved().ssl
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / "hubert_fairseq_base_ls960.pth"
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"")
    assert ssl_module.weights_file(spec) == hub_file


def test_fit_stores_the_ssl_front_end_in_the_checkpoint(ssl_checkpoint):
    checkpoint = torch.load(ssl_checkpoint, map_location="cpu", weights_only=True)
    feature = checkpoint["datamodule_hyper_parameters"]["feature"]
    assert feature["name"] == "ssl" and feature["ssl_layer"] == [1, 2] and feature["ssl_arch"]["encoder_embed_dim"] == 32
    assert checkpoint["hyper_parameters"]["num_features"] == 32


def test_a_second_setup_reads_the_cache_without_decoding_or_extracting(ssl_checkpoint, tiny_corpus, tiny_weights,
                                                                       ssl_cache, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("audio was decoded or the ssl model run although the cache holds every file")

    monkeypatch.setattr(loading_module, "load_audio", no_work)
    monkeypatch.setattr(SSLExtractor, "_hidden", no_work)

    def datamodule(**options) -> SERDataModule:
        return SERDataModule(root=str(tiny_corpus), feature=tiny_config(tiny_weights, **options), num_folds=3,
                             num_val_speakers=1, cache_dir=str(ssl_cache), emotions=list(TINY_EMOTIONS))

    cached = datamodule()
    cached.setup()  # features written by the fit run
    assert len(cached.features) == 6 * 28 and all(f.shape[0] == 32 for f in cached.features)
    with pytest.raises(AssertionError, match="decoded"):  # another layer choice is not cached
        datamodule(ssl_layer=2).setup()


def test_cv_runs_two_folds_with_the_ssl_front_end(tiny_corpus, tiny_weights, ssl_cache, ssl_checkpoint, tmp_path):
    out = tmp_path / "cv"
    main(["cv", "--folds=2", f"--out={out}", *tiny_args(tiny_corpus, tmp_path, *ssl_args(tiny_weights, ssl_cache))])
    report = json.loads((out / "cv_report.json").read_text())
    assert report["complete"] and [f["fold"] for f in report["folds"]] == [0, 1]
    for fold in (0, 1):
        result = json.loads((out / f"fold_{fold}" / "result.json").read_text())
        assert result["config"]["data"]["feature"]["name"] == "ssl" and result["num_test_utterances"] > 0


def test_predict_a_file_with_an_ssl_checkpoint(ssl_checkpoint, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "prediction.json"
    wav = sorted(tiny_corpus.rglob("*.wav"))[0]
    main(["predict", "--ckpt_path", str(ssl_checkpoint), str(wav), "--output", str(out)])
    assert "1 files: 1 predicted, 0 failed" in capsys.readouterr().out
    (record,) = json.loads(out.read_text())
    assert record["status"] == "ok" and record["emotion"] in TINY_EMOTIONS
    assert list(record["probabilities"]) == list(TINY_EMOTIONS)



def test_a_recognizer_without_its_weights_fails_once_naming_the_file(ssl_checkpoint, tmp_path):
    from ser_lightning import EmotionRecognizer

    gone = tmp_path / "moved_away.pt"
    with pytest.raises(SSLWeightsError, match=f"data.feature.ssl_weights: '{gone}' is not a file"):
        EmotionRecognizer.from_checkpoint(ssl_checkpoint, feature=tiny_config(gone))
