"""Self-supervised speech models as the feature front end (``data.feature.name: ssl``).

The model (``data.feature.ssl_model``) is one of torchaudio's pre-trained wav2vec 2.0, HuBERT or
WavLM bundles (``BUNDLES``), or ``custom``: an architecture given in the configuration
(``ssl_arch``: ``family`` wav2vec2 | wavlm plus the keyword arguments of
``torchaudio.models.wav2vec2_model`` / ``wavlm_model``) with its weights in a local file. The
features of an utterance are the hidden states of one transformer layer (``ssl_layer: 7``) or the
mean of several (``ssl_layer: [6, 7, 8]``), layers numbered 1..L; by default the middle layer.
Output: (F, N) with F = the model's width (768 base, 1024 large) and one frame per 20 ms (hop 320
samples at 16 kHz; a clip shorter than the 400-sample receptive field is zero-padded to one frame).

Weights: ``ssl_weights: /path/file.pt`` (a state dict of the architecture, read with
``torch.load(weights_only=True)``), else the bundle's own file in the torch hub cache
(``torch.hub.get_dir()/checkpoints/<file>``, where torchaudio's ``bundle.get_model()`` keeps it
too), downloaded there on first use unless ``SER_LIGHTNING_OFFLINE=1``. When neither works,
``SSLWeightsError`` names the file to provide and where to put it.

The model is loaded lazily, once per process and device (``load_model``), on the GPU when one is
present, in eval mode and never trained: the DataModule computes the features once and caches them
on disk like the others (the cache key holds the model, its layers and the weights file's identity).

Batches are formed only where they give the same features as one utterance at a time: wav2vec 2.0
and HuBERT models whose convolutional front end normalises each frame on its own
(``extractor_mode: layer_norm``, the large ones) take zero-padded batches with lengths; the others
(group norm over the whole utterance in the base models; WavLM, whose attention in torchaudio takes
no padding mask) batch utterances of equal length only. Waveform normalisation (``normalize_waveform``
bundles) is done per utterance.
"""
from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ser_lightning.errors import DataError
from ser_lightning.padding import pad_last

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
CUSTOM = "custom"
FAMILIES = ("wav2vec2", "wavlm")
OFFLINE_ENV = "SER_LIGHTNING_OFFLINE"
DOWNLOAD_BASE = "https://download.pytorch.org/torchaudio/models/"
STANDARD_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
"""The convolutional front end of every torchaudio bundle: 400-sample receptive field, 320-sample hop."""
MAX_BATCH_SAMPLES = 64 * SAMPLE_RATE
"""Audio per forward pass when utterances are batched (bounds the front end's activation memory)."""


class SSLWeightsError(DataError, ValueError):
    """The weights of a self-supervised model are neither local nor downloadable, or do not fit it."""


@dataclass(frozen=True)
class SSLBundle:
    """A torchaudio pre-trained model: weights file, family, layers, width and front-end normalisation."""

    name: str
    file: str
    family: str
    num_layers: int
    width: int
    extractor_mode: str
    normalize_waveform: bool


BUNDLES: dict[str, SSLBundle] = {
    bundle.name: bundle
    for bundle in (
        SSLBundle("WAV2VEC2_BASE", "wav2vec2_fairseq_base_ls960.pth", "wav2vec2", 12, 768, "group_norm", False),
        SSLBundle("WAV2VEC2_LARGE", "wav2vec2_fairseq_large_ls960.pth", "wav2vec2", 24, 1024, "group_norm", False),
        SSLBundle("WAV2VEC2_LARGE_LV60K", "wav2vec2_fairseq_large_lv60k.pth", "wav2vec2", 24, 1024, "layer_norm", True),
        SSLBundle("WAV2VEC2_XLSR53", "wav2vec2_fairseq_large_xlsr53.pth", "wav2vec2", 24, 1024, "layer_norm", True),
        SSLBundle("WAV2VEC2_XLSR_300M", "wav2vec2_xlsr_300m.pth", "wav2vec2", 24, 1024, "layer_norm", True),
        SSLBundle("WAV2VEC2_XLSR_1B", "wav2vec2_xlsr_1b.pth", "wav2vec2", 48, 1280, "layer_norm", True),
        SSLBundle("WAV2VEC2_XLSR_2B", "wav2vec2_xlsr_2b.pth", "wav2vec2", 48, 1920, "layer_norm", True),
        SSLBundle("HUBERT_BASE", "hubert_fairseq_base_ls960.pth", "wav2vec2", 12, 768, "group_norm", False),
        SSLBundle("HUBERT_LARGE", "hubert_fairseq_large_ll60k.pth", "wav2vec2", 24, 1024, "layer_norm", True),
        SSLBundle("HUBERT_XLARGE", "hubert_fairseq_xlarge_ll60k.pth", "wav2vec2", 48, 1280, "layer_norm", True),
        SSLBundle("WAVLM_BASE", "wavlm_base.pth", "wavlm", 12, 768, "group_norm", False),
        SSLBundle("WAVLM_BASE_PLUS", "wavlm_base_plus.pth", "wavlm", 12, 768, "group_norm", False),
        SSLBundle("WAVLM_LARGE", "wavlm_large.pth", "wavlm", 24, 1024, "layer_norm", True),
    )
}
"""torchaudio's pre-trained (not fine-tuned) bundles; ``tests/test_ssl.py`` checks this table against torchaudio."""
DEFAULT_MODEL = "WAVLM_BASE_PLUS"


@dataclass(frozen=True)
class SSLSpec:
    """A resolved SSL front end: which model, which layers, which weights, and its shape.

    ``arch`` holds the architecture keyword arguments of a custom model (sorted, lists as tuples);
    empty for a bundle, whose arguments come from torchaudio.
    """

    model: str
    layers: tuple[int, ...]
    weights: str | None
    family: str
    num_layers: int
    width: int
    extractor_mode: str
    normalize_waveform: bool
    conv_layers: tuple[tuple[int, int, int], ...]
    arch: tuple[tuple[str, Any], ...] = ()

    @property
    def hop_length(self) -> int:
        """Samples between frames: the product of the convolution strides (320 for every bundle)."""
        hop = 1
        for _, _, stride in self.conv_layers:
            hop *= stride
        return hop

    @property
    def receptive_field(self) -> int:
        """Samples one frame sees (400 for every bundle); shorter clips are zero-padded to it."""
        size = 1
        for _, kernel, stride in reversed(self.conv_layers):
            size = (size - 1) * stride + kernel
        return size

    @property
    def padding_safe(self) -> bool:
        """Whether a zero-padded batch with lengths gives each utterance the features it has alone."""
        return self.family == "wav2vec2" and self.extractor_mode == "layer_norm"

    @property
    def weights_path(self) -> Path:
        """The weights file: ``ssl_weights``, else the bundle's file in the torch hub cache."""
        if self.weights is not None:
            return Path(self.weights).expanduser()
        return Path(torch.hub.get_dir()) / "checkpoints" / BUNDLES[self.model].file

    def identity(self) -> str:
        """What identifies the weights for the feature cache: the bundle's file name, or path, size and mtime."""
        if self.weights is None:
            return BUNDLES[self.model].file
        path = self.weights_path
        if not path.is_file():
            raise _missing_local_file(path, self.model)
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _missing_local_file(path: Path, model: str) -> SSLWeightsError:
    return SSLWeightsError(f"data.feature.ssl_weights: '{path}' is not a file (a state dict of the {model} "
                           "architecture, saved with torch.save)")


def _factory(family: str) -> Any:
    from torchaudio.models import wav2vec2_model, wavlm_model

    return {"wav2vec2": wav2vec2_model, "wavlm": wavlm_model}[family]


def _frozen(value: Any) -> Any:
    """Lists (from YAML) as tuples, so that the spec is hashable and its key stable."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _custom_arch(arch: Mapping[str, Any] | None) -> tuple[str, dict[str, Any], bool]:
    """(family, factory keyword arguments, normalize_waveform) of ``ssl_arch``; ValueError naming the option."""
    option = "data.feature.ssl_arch"
    if not isinstance(arch, Mapping):
        raise ValueError(f"{option}: ssl_model 'custom' needs the architecture: family (wav2vec2 | wavlm) and the "
                         "keyword arguments of torchaudio.models.wav2vec2_model / wavlm_model")
    options = dict(arch)
    family = options.pop("family", None)
    normalize = bool(options.pop("normalize_waveform", False))
    if family not in FAMILIES:
        raise ValueError(f"{option}.family: '{family}' is not one of {list(FAMILIES)}")
    parameters = inspect.signature(_factory(family)).parameters
    unknown = sorted(set(options) - set(parameters))
    missing = sorted(name for name in parameters if name not in options)
    if unknown or missing:
        raise ValueError(f"{option}: unknown {unknown}, missing {missing} (the keyword arguments of "
                         f"torchaudio.models.{_factory(family).__name__})")
    options["extractor_conv_layer_config"] = _frozen(options["extractor_conv_layer_config"] or STANDARD_CONV)
    for name in ("encoder_embed_dim", "encoder_num_layers"):
        if not isinstance(options[name], int) or options[name] < 1:
            raise ValueError(f"{option}.{name}: must be a positive integer, got {options[name]!r}")
    return family, options, normalize


def resolve_ssl(
    model: str | None, layer: int | Sequence[int] | None, weights: str | None, arch: Mapping[str, Any] | None
) -> SSLSpec:
    """Check the ssl options (without loading anything) and resolve them; ValueError naming the option."""
    model = model or DEFAULT_MODEL
    if model == CUSTOM:
        if weights is None:
            raise ValueError("data.feature.ssl_weights: ssl_model 'custom' needs its weights file (a state dict)")
        family, options, normalize = _custom_arch(arch)
        num_layers, width = options["encoder_num_layers"], options["encoder_embed_dim"]
        mode, conv = options["extractor_mode"], options["extractor_conv_layer_config"]
        frozen_arch = tuple(sorted((name, _frozen(value)) for name, value in options.items()))
    elif model in BUNDLES:
        if arch is not None:
            raise ValueError(f"data.feature.ssl_arch: only for ssl_model 'custom' ({model} has a fixed architecture)")
        bundle = BUNDLES[model]
        family, num_layers, width = bundle.family, bundle.num_layers, bundle.width
        mode, conv, normalize, frozen_arch = bundle.extractor_mode, STANDARD_CONV, bundle.normalize_waveform, ()
    else:
        raise ValueError(f"data.feature.ssl_model: unknown model '{model}'; choose from {sorted(BUNDLES)} or "
                         f"'{CUSTOM}' (with ssl_arch and ssl_weights)")
    layers = _layers(layer, num_layers, model)
    if not all(len(shape) == 3 and min(shape) >= 1 for shape in conv):
        raise ValueError(f"data.feature.ssl_arch.extractor_conv_layer_config: give [channels, kernel, stride] "
                         f"per layer, each >= 1; got {[list(shape) for shape in conv]}")
    return SSLSpec(model, layers, None if weights is None else str(weights), family, num_layers, width, mode, normalize,
                   tuple(tuple(layer_config) for layer_config in conv), frozen_arch)


def _layers(layer: int | Sequence[int] | None, num_layers: int, model: str) -> tuple[int, ...]:
    if layer is None:
        return (max(1, num_layers // 2),)
    layers = (layer,) if isinstance(layer, int) else tuple(layer)
    bad = [k for k in layers if not isinstance(k, int) or not 1 <= k <= num_layers]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(f"data.feature.ssl_layer: {layer!r}: give one layer or a list of distinct layers in "
                         f"1..{num_layers} ({model} has {num_layers} transformer layers)")
    return tuple(sorted(layers))


def ssl_device() -> torch.device:
    """Where SSL features are computed: the current GPU when one is present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def download_url_to_file(url: str, destination: str, progress: bool = True) -> None:
    """torch's downloader (a module-level name, so that tests can replace it)."""
    torch.hub.download_url_to_file(url, destination, progress=progress)


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def weights_file(spec: SSLSpec) -> Path:
    """The local weights file of ``spec``, downloading a bundle's file into the hub cache if needed."""
    path = spec.weights_path
    if path.is_file():
        return path
    if spec.weights is not None:
        raise _missing_local_file(path, spec.model)
    url = DOWNLOAD_BASE + BUNDLES[spec.model].file
    advice = (f"put the file {path.name} (from {url}) at {path}, or give a local copy as data.feature.ssl_weights")
    if _offline():
        raise SSLWeightsError(f"data.feature.ssl_model={spec.model}: the weights are not in the torch hub cache and "
                              f"{OFFLINE_ENV} is set: {advice}")
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading the %s weights from %s to %s", spec.model, url, path)
    try:
        download_url_to_file(url, str(path))
    except Exception as error:  # noqa: BLE001 - no network, proxy, HTTP error, disk full: all end here
        raise SSLWeightsError(f"data.feature.ssl_model={spec.model}: the weights are not in the torch hub cache and "
                              f"could not be downloaded ({type(error).__name__}: {error}): {advice}") from error
    return path


def build_model(spec: SSLSpec) -> nn.Module:
    """The architecture of ``spec`` with random weights."""
    if spec.model == CUSTOM:
        params = dict(spec.arch)
    else:
        import torchaudio.pipelines

        params = dict(getattr(torchaudio.pipelines, spec.model)._params)
    params["extractor_conv_layer_config"] = [list(layer) for layer in params["extractor_conv_layer_config"]]
    return _factory(spec.family)(**params)


def _read_state(path: Path, spec: SSLSpec) -> Any:
    """The state dict in ``path``, memory-mapped where the file allows it (the model holds the only copy)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an older serialization format cannot be mapped: read it whole below
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, not a torch file, unsafe content
        raise SSLWeightsError(f"{path}: cannot read the {spec.model} weights ({type(error).__name__}: {error})") from error


_MODELS: dict[tuple[str, tuple, str, str], nn.Module] = {}
"""Loaded models by (model, architecture, weights identity, device): every layer choice shares one."""


def load_model(spec: SSLSpec, device: torch.device | str) -> nn.Module:
    """The model of ``spec`` with its weights, in eval mode on ``device``; loaded once per process."""
    device = torch.device(device)
    key = (spec.model, spec.arch, spec.identity(), str(device))
    if key not in _MODELS:
        path = weights_file(spec)
        state = _read_state(path, spec)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        model = build_model(spec)
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as error:
            raise SSLWeightsError(f"{path}: not a state dict of the {spec.model} architecture: {error}") from error
        _MODELS[key] = model.eval().requires_grad_(False).to(device)
        log.info("loaded the %s front end from %s on %s", spec.model, path, device)
    return _MODELS[key]


class SSLExtractor(nn.Module):
    """Waveforms at 16 kHz -> the mean of the chosen layers' hidden states, (F, N) or (B, F, N).

    Holds only the configuration; the model is fetched from the per-process cache on first use.
    Features are computed on ``device`` (default: the GPU when present) and returned on the device
    of the input, as float32.
    """

    def __init__(self, spec: SSLSpec, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.compute_device = torch.device(device) if device is not None else ssl_device()

    @property
    def hop_length(self) -> int:
        return self.spec.hop_length

    def load(self) -> nn.Module:
        """The model (loaded now if it is not yet): SSLWeightsError names the weights file if it cannot be."""
        return load_model(self.spec, self.compute_device)

    def frames(self, num_samples: int | Tensor) -> int | Tensor:
        """Frames of a clip of ``num_samples`` samples (clips shorter than the receptive field give one)."""
        if isinstance(num_samples, Tensor):
            length = num_samples.clamp(min=self.spec.receptive_field)
            for _, kernel, stride in self.spec.conv_layers:
                length = torch.div(length - kernel, stride, rounding_mode="floor") + 1
            return length
        length = max(int(num_samples), self.spec.receptive_field)
        for _, kernel, stride in self.spec.conv_layers:
            length = (length - kernel) // stride + 1
        return length

    def _prepare(self, wave: Tensor) -> Tensor:
        """One utterance (T,): normalised if the model expects it, zero-padded to the receptive field."""
        wave = wave.float().to(self.compute_device)
        if self.spec.normalize_waveform:
            wave = nn.functional.layer_norm(wave, wave.shape)
        shortfall = self.spec.receptive_field - wave.shape[-1]
        return nn.functional.pad(wave, (0, shortfall)) if shortfall > 0 else wave

    @torch.no_grad()
    def _hidden(self, batch: Tensor, lengths: Tensor | None) -> Tensor:
        """(B, T) prepared waveforms -> (B, F, N) mean of the chosen layers."""
        states, _ = self.load().extract_features(batch, lengths, num_layers=max(self.spec.layers))
        chosen = torch.stack([states[layer - 1] for layer in self.spec.layers]).mean(dim=0)  # (B, N, F)
        return chosen.transpose(1, 2).float()

    def forward(self, wave: Tensor) -> Tensor:
        if wave.dim() not in (1, 2):
            raise ValueError(f"SSLExtractor expects a waveform (T,) or (B, T), got shape {tuple(wave.shape)}")
        rows = wave if wave.dim() == 2 else wave.unsqueeze(0)
        features = self._hidden(torch.stack([self._prepare(row) for row in rows]), None).to(wave.device)
        return features if wave.dim() == 2 else features[0]

    def extract_many(self, waves: Sequence[Tensor]) -> list[Tensor]:
        """Features (F, N_i) of each waveform (T_i,), computed in batches that do not change them."""
        results: list[Tensor | None] = [None] * len(waves)
        order = sorted(range(len(waves)), key=lambda k: waves[k].shape[-1])
        group: list[int] = []

        def flush() -> None:
            prepared = [self._prepare(waves[k]) for k in group]
            if len(prepared) == 1 or not self.spec.padding_safe:
                hidden = self._hidden(torch.stack(prepared), None)
                for position, k in enumerate(group):
                    results[k] = hidden[position].cpu()
            else:
                batch, lengths = pad_last(prepared)
                hidden = self._hidden(batch, lengths)
                for position, k in enumerate(group):
                    results[k] = hidden[position, :, : self.frames(waves[k].shape[-1])].cpu()
            group.clear()

        for k in order:
            size = max(waves[k].shape[-1], self.spec.receptive_field)
            fits = self.spec.padding_safe or not group or waves[group[0]].shape[-1] == waves[k].shape[-1]
            if group and (not fits or size * (len(group) + 1) > MAX_BATCH_SAMPLES):
                flush()
            group.append(k)
        if group:
            flush()
        return [result for result in results if result is not None]
