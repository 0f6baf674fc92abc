"""A small signal-level speech-like synthesizer writing a corpus in the layout of RAVDESS or another corpus.

Each file is a glottal (Rosenberg) pulse train with an f0 contour, jitter, shimmer and aspiration
noise; each syllable is shaped by an amplitude envelope and filtered by the formants of its vowel
(scaled by the actor's vocal-tract length) and a spectral tilt; short noise bursts stand for the
consonants; silence with a low noise floor surrounds the utterance. Emotions shift the prosody
the way the literature describes (Scherer 2003; Juslin & Laukka 2003): pitch level and range,
speaking rate, loudness, spectral tilt (vocal effort), jitter and breathiness; the strong
intensity exaggerates the shift. Actor voices and per-file randomness make the classes overlap.

Since generator version 2 emotions also change what global prosody does not show (each documented
in the emotion literature): the voice quality of the glottal pulse itself (tense voice in anger,
with a short open phase and an abrupt closure; lax, breathy voice in sadness and calm: Gobl & Ni
Chasaide 2003), the precision of articulation (a vowel space expanded in anger and joy, reduced in
sadness: Kienast & Sendlmeier 2000), the raised formants of smiled speech (joy: Tartter 1980), the
first formant rising with vocal effort (Lienard & Di Benedetto 1999), and a slow vocal tremor of
the f0 contour (4.5-7 Hz, strongest in fear, some in sadness: Scherer 1986).

Every file has its own random generator seeded from (random seed, actor, file code), so a corpus
with fewer actors or emotions is an exact subset of the full one. Each corpus module says how its
files are named (``Corpus.synthetic_files``); this module only renders audio.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ser_lightning.errors import CommandParser, DataError, UsageError

from .corpora import CORPORA, corpus_info
from .records import EMOTIONS

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class Prosody:
    """Emotion-dependent voice settings, relative to a speaker's neutral voice."""

    f0: float  # pitch level factor
    f0_range: float  # pitch-accent size factor
    rate: float  # speaking-rate factor
    loudness_db: float
    tilt_db: float  # spectral tilt change in dB/octave (> 0: flatter, more high-frequency energy)
    jitter: float  # relative cycle-to-cycle f0 perturbation
    breath: float  # aspiration noise relative to voicing
    final_rise: float  # semitones of terminal pitch movement
    tension: float  # voice quality, -1 lax/breathy .. +1 tense/pressed: the glottal pulse's open and closing phases
    articulation: float  # vowel-space scale around the neutral vowel (> 1: hyperarticulated)
    formant_shift: float  # factor on all formants (> 1: a shorter vocal tract, as in smiled speech)
    tremor: float  # depth in semitones of a slow (4.5-7 Hz) f0 tremor


PROSODY = {
    #                    f0    range rate  dB    tilt  jitter breath final tension artic shift tremor
    "neutral": Prosody(1.00, 1.00, 1.00, 0.0, 0.0, 0.010, 0.05, -0.5, 0.0, 1.00, 1.00, 0.05),
    "calm": Prosody(0.96, 0.80, 0.90, -2.0, -1.0, 0.008, 0.08, -1.0, -0.5, 0.94, 1.00, 0.05),
    "happy": Prosody(1.16, 1.50, 1.08, 2.5, 1.2, 0.012, 0.05, 1.0, 0.3, 1.08, 1.04, 0.05),
    "sad": Prosody(0.93, 0.60, 0.82, -3.5, -2.0, 0.016, 0.12, -1.5, -0.8, 0.86, 1.00, 0.25),
    "angry": Prosody(1.20, 1.50, 1.10, 5.0, 3.0, 0.016, 0.04, -1.0, 1.0, 1.12, 1.00, 0.05),
    "fearful": Prosody(1.28, 1.20, 1.14, 1.0, 0.8, 0.030, 0.10, 1.0, -0.2, 1.04, 1.00, 0.60),
    "disgust": Prosody(0.94, 1.10, 0.84, 0.0, -0.5, 0.020, 0.08, -2.0, 0.3, 0.95, 0.98, 0.10),
    "surprised": Prosody(1.24, 1.90, 1.00, 2.5, 1.0, 0.012, 0.06, 4.0, 0.2, 1.08, 1.01, 0.05),
}
NEUTRAL_VOWEL = np.array([500.0, 1500.0, 2500.0])
"""F1-F3 (Hz, adult male) of the central vowel that articulation expands the vowel space around."""
F1_PER_DB = 0.007
"""Relative rise of F1 per dB of vocal effort (a more open jaw)."""
STRONG_SCALE = 1.6
"""The strong intensity multiplies an emotion's deviation from neutral by this factor."""

# Peterson & Barney (1952) adult-male formants F1-F3 (Hz); F4, F5 fixed.
VOWELS = {
    "i": (270, 2290, 3010), "I": (390, 1990, 2550), "E": (530, 1840, 2480), "ae": (660, 1720, 2410),
    "a": (730, 1090, 2440), "O": (570, 840, 2410), "U": (440, 1020, 2240), "u": (300, 870, 2240),
    "V": (640, 1190, 2390),
}
BANDWIDTHS = np.array([60.0, 90.0, 120.0, 180.0, 250.0])
# (vowel, stressed) per syllable: "Kids are talking by the door" / "Dogs are sitting by the door".
STATEMENTS = {
    1: (("I", 1), ("a", 0), ("O", 1), ("I", 0), ("a", 1), ("V", 0), ("O", 1)),
    2: (("O", 1), ("a", 0), ("I", 1), ("i", 0), ("a", 0), ("V", 0), ("O", 1)),
}


@dataclass(frozen=True)
class Voice:
    """One actor's voice."""

    f0: float  # neutral mean f0 in Hz
    formant_scale: float  # 1 / relative vocal-tract length
    gain_db: float
    tilt_db: float
    rate: float


def actor_voice(random_seed: int, actor: int) -> Voice:
    """Draw an actor's voice; odd actors are male, even female (as in RAVDESS)."""
    rng = np.random.default_rng([random_seed, actor, 7919])
    male = actor % 2 == 1
    return Voice(
        f0=rng.uniform(95, 145) if male else rng.uniform(170, 245),
        formant_scale=rng.uniform(0.94, 1.06) * (1.0 if male else 1.16),
        gain_db=rng.normal(0, 2.0),
        tilt_db=rng.normal(0, 1.0),
        rate=float(np.exp(rng.normal(0, 0.06))),
    )


def file_prosody(rng: np.random.Generator, emotion: str, strong: bool) -> Prosody:
    """The emotion's prosody (scaled for strong intensity) with per-file random variation."""
    p, n = PROSODY[emotion], PROSODY["neutral"]
    k = STRONG_SCALE if strong else 1.0

    def factor(value: float, base: float, spread: float) -> float:
        return float(base * (value / base) ** k * np.exp(rng.normal(0, spread)))

    def offset(value: float, base: float, spread: float) -> float:
        return float(base + k * (value - base) + rng.normal(0, spread))

    return Prosody(
        f0=factor(p.f0, n.f0, 0.08),
        f0_range=factor(p.f0_range, n.f0_range, 0.25),
        rate=factor(p.rate, n.rate, 0.08),
        loudness_db=offset(p.loudness_db, n.loudness_db, 3.5),
        tilt_db=offset(p.tilt_db, n.tilt_db, 1.5),
        jitter=factor(p.jitter, n.jitter, 0.3),
        breath=factor(p.breath, n.breath, 0.3),
        final_rise=offset(p.final_rise, n.final_rise, 1.0),
        tension=float(np.clip(offset(p.tension, n.tension, 0.3), -1.5, 1.5)),
        articulation=factor(p.articulation, n.articulation, 0.04),
        formant_shift=factor(p.formant_shift, n.formant_shift, 0.015),
        tremor=(n.tremor + k * (p.tremor - n.tremor)) * float(np.exp(rng.normal(0, 0.3))),
    )


def _smooth_noise(rng: np.random.Generator, n: int, sample_rate: int, rate_hz: float) -> np.ndarray:
    """Unit-variance noise varying at about ``rate_hz`` (linear interpolation of control points)."""
    points = max(2, int(n / sample_rate * rate_hz) + 2)
    return np.interp(np.linspace(0, points - 1, n), np.arange(points), rng.normal(size=points))


def _rosenberg(phase: np.ndarray, open_q: float = 0.45, close_q: float = 0.15) -> np.ndarray:
    """Rosenberg glottal flow pulse for phase in [0, 1)."""
    rising = 0.5 * (1 - np.cos(np.pi * phase / open_q))
    falling = np.cos(0.5 * np.pi * (phase - open_q) / close_q)
    return np.where(phase < open_q, rising, np.where(phase < open_q + close_q, falling, 0.0))


def _response(freqs: np.ndarray, sample_rate: int, formants: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Frequency response of a cascade of unit-DC-gain two-pole resonators."""
    z1 = np.exp(-2j * np.pi * freqs / sample_rate)
    h = np.ones_like(z1)
    for f, b in zip(formants, bandwidths):
        if f >= 0.45 * sample_rate:
            continue
        r = np.exp(-np.pi * b / sample_rate)
        c1, c2 = 2 * r * np.cos(2 * np.pi * f / sample_rate), -r * r
        h = h * (1 - c1 - c2) / (1 - c1 * z1 - c2 * z1 * z1)
    return h


def _tilt(freqs: np.ndarray, db_per_octave: float) -> np.ndarray:
    return 10 ** (db_per_octave * np.log2(np.maximum(freqs, 100.0) / 500.0) / 20)


def _filter(x: np.ndarray, sample_rate: int, transfer, tail: int) -> np.ndarray:
    """Filter ``x`` (zero-padded by ``tail`` samples) by a frequency response function of freqs."""
    n = 1 << (len(x) + tail - 1).bit_length()  # a power of two: fast FFT sizes
    freqs = np.fft.rfftfreq(n, 1 / sample_rate)
    return np.fft.irfft(np.fft.rfft(x, n) * transfer(freqs), n)[: len(x) + tail]


def render_utterance(
    rng: np.random.Generator, voice: Voice, emotion: str, strong: bool, statement: int, sample_rate: int
) -> np.ndarray:
    """Synthesize one utterance as float32 samples in [-1, 1]."""
    p = file_prosody(rng, emotion, strong)
    syllables = STATEMENTS[statement]
    stress = np.array([s for _, s in syllables], dtype=bool)
    n_syl = len(syllables)
    rate = p.rate * voice.rate
    durations = np.where(stress, 0.24, 0.14) / rate * np.exp(rng.normal(0, 0.12, n_syl))
    gaps = rng.uniform(0.03, 0.08, n_syl) / rate
    lead, trail = rng.uniform(0.3, 0.7, 2)
    starts = lead + np.cumsum(gaps) + np.concatenate([[0.0], np.cumsum(durations[:-1])])
    total = int((starts[-1] + durations[-1] + trail) * sample_rate)
    t = np.arange(total) / sample_rate

    # f0 contour in semitones: pitch accents on stressed syllables, declination, final movement.
    centres = starts + durations / 2
    accents = np.where(stress, 2.5, 0.4) * p.f0_range * np.exp(rng.normal(0, 0.25, n_syl))
    targets = accents - 2.0 * (centres - centres[0]) / max(centres[-1] - centres[0], 1e-3)
    targets[-1] += p.final_rise
    semitones = np.interp(t, centres, targets) + 0.3 * _smooth_noise(rng, total, sample_rate, 4.0)
    semitones += p.tremor * np.sin(2 * np.pi * rng.uniform(4.5, 7.0) * t + rng.uniform(0, 2 * np.pi))
    f0 = voice.f0 * p.f0 * 2 ** (semitones / 12)
    f0 = f0 * (1 + p.jitter * _smooth_noise(rng, total, sample_rate, f0.mean()))
    pulse = _rosenberg(np.cumsum(f0 / sample_rate) % 1.0, 0.45 - 0.08 * p.tension, 0.15 - 0.05 * p.tension)
    shimmer = 1 + 2.5 * p.jitter * _smooth_noise(rng, total, sample_rate, f0.mean())
    source = np.diff(pulse * shimmer, prepend=0.0) * (f0 / 150.0) ** -0.5
    source += p.breath * 0.05 * rng.normal(size=total) * (0.3 + pulse)

    out = np.zeros(total + sample_rate // 10)
    tail = sample_rate // 20
    formant_scale = voice.formant_scale * np.exp(rng.normal(0, 0.03))
    tilt = p.tilt_db + voice.tilt_db
    for i, (vowel, stressed) in enumerate(syllables):
        a, b = int(starts[i] * sample_rate), int((starts[i] + durations[i]) * sample_rate)
        ramp = max(1, (b - a) // 4)
        envelope = np.ones(b - a)
        envelope[:ramp] = np.sin(np.linspace(0, np.pi / 2, ramp)) ** 2
        envelope[-ramp:] = envelope[:ramp][::-1]
        f123 = NEUTRAL_VOWEL + (np.array(VOWELS[vowel]) - NEUTRAL_VOWEL) * p.articulation
        f123[0] *= 1 + F1_PER_DB * p.loudness_db
        formants = np.array([*f123, 3400.0, 4400.0]) * p.formant_shift * formant_scale * np.exp(rng.normal(0, 0.04, 5))
        gain = 1.0 if stressed else 0.6
        voiced = _filter(
            source[a:b] * envelope * gain, sample_rate,
            lambda f: _response(f, sample_rate, formants, BANDWIDTHS) * _tilt(f, tilt), tail,
        )
        out[a : a + len(voiced)] += voiced
        # consonant: a short band-pass noise burst in the gap before the syllable
        g = max(1, int(gaps[i] * sample_rate * 0.6))
        burst = rng.normal(size=g) * np.hanning(g) * 0.02
        centre = rng.uniform(2500, 5000) * formant_scale
        noise = _filter(burst, sample_rate, lambda f: _response(f, sample_rate, [centre], [1500.0]), tail)
        out[max(0, a - g) : max(0, a - g) + len(noise)] += noise

    out = out[:total]
    rms = np.sqrt(np.mean(out**2)) + 1e-12
    level_db = -26.0 + p.loudness_db + voice.gain_db + rng.normal(0, 3.0)
    out *= 10 ** (level_db / 20) / rms
    out += 10 ** (-68 / 20) * rng.normal(size=total)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


LAYOUTS = tuple(CORPORA)
"""Corpora whose file layout the synthesizer writes (all of them)."""


def synthesize_corpus(
    out_dir: str | Path,
    *,
    actors: int | None = None,
    emotions: Sequence[str] = EMOTIONS,
    sample_rate: int = 16000,
    random_seed: int = 0,
    layout: str = "ravdess",
) -> list[Path]:
    """Write a synthetic corpus (16-bit PCM) in the file layout of corpus ``layout``; returns the audio paths.

    ravdess: ``Actor_NN/03-01-EE-II-SS-RR-NN.wav``, 60 files per actor for all eight emotions
    (neutral has no strong intensity), 24 actors by default. The other layouts write three files
    per speaker and emotion under the corpus's own names and speaker ids, plus its side files
    (each corpus module describes its layout). ``actors`` takes the first speakers (default: the
    corpus's ``default_speakers``). Emotions a corpus lacks (e.g. calm for cremad) are left out.
    """
    corpus = corpus_info(layout, option="layout")
    actors = corpus.default_speakers if actors is None else actors
    if not 1 <= actors <= corpus.max_speakers:
        raise ValueError(f"actors: the {layout} layout takes 1 to {corpus.max_speakers} speakers, got {actors}")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate: must be at least 8000 Hz, got {sample_rate}")
    unknown = [e for e in emotions if e not in EMOTIONS]
    if unknown or not emotions:
        raise ValueError(f"emotions: unknown or empty {list(emotions)}; valid names are {list(EMOTIONS)}")
    classes = corpus.classes or EMOTIONS
    emotions = [e for e in classes if e in emotions]
    if not emotions:
        raise ValueError(f"emotions: the {layout} layout has none of these; it has {list(classes)}")
    out_dir = Path(out_dir)
    paths, rows = [], []
    for speaker in corpus.synthetic_speakers(actors):
        voice = actor_voice(random_seed, speaker.voice)
        for planned in corpus.synthetic_files(speaker, emotions):
            generator = np.random.default_rng([random_seed, *planned.random_key])
            wave = render_utterance(generator, voice, planned.emotion, planned.strong, planned.statement, sample_rate)
            path = out_dir / planned.relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), wave, sample_rate, subtype="PCM_16")
            paths.append(path)
            rows.append((planned, speaker))
    if corpus.write_synthetic_metadata is not None:
        corpus.write_synthetic_metadata(out_dir, rows)
    return paths


def default_cache_dir() -> Path:
    """``$SER_LIGHTNING_CACHE`` or ``~/.cache/ser_lightning``."""
    return Path(os.environ.get("SER_LIGHTNING_CACHE") or Path.home() / ".cache" / "ser_lightning").expanduser()


def default_synthetic_root(
    cache_dir: str | Path | None = None, *, actors: int = 24, sample_rate: int = 16000, random_seed: int = 0
) -> Path:
    """Where the built-in synthetic corpus for these parameters lives."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    name = f"ravdess-like-v{GENERATOR_VERSION}-actors{actors}-sr{sample_rate}-random{random_seed}"
    return base / "synthetic" / name


def _temporary_prefix(target: Path) -> str:
    """Name prefix of the temporary folders this machine's processes write ``target`` in (then the process id)."""
    return f".{target.name}.tmp-{socket.gethostname()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_abandoned_temporaries(target: Path) -> list[Path]:
    """Remove the temporary folders of ``target`` whose process (on this machine) no longer runs, e.g. one
    killed while writing; returns them. Temporary folders of running processes are left alone."""
    prefix, removed = _temporary_prefix(target), []
    for folder in target.parent.glob(f".{target.name}.tmp-*"):
        pid = folder.name[len(prefix):].split("-")[0] if folder.name.startswith(prefix) else ""
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def write_complete(target: Path, write: Callable[[Path], object], replace_incomplete: bool = False) -> bool:
    """Run ``write(folder)`` on a temporary folder beside ``target`` and rename it to ``target`` when complete.

    An interrupted or failed write (an exception, Ctrl-C) removes its temporary folder; one killed
    outright is removed by the next call for the same target. Returns False when ``target`` already
    existed (e.g. a concurrent writer finished first) and was left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries(target)
    tmp = target.parent / f"{_temporary_prefix(target)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if replace_incomplete and target.exists() and not (target / COMPLETE_MARKER).exists():
            shutil.rmtree(target)  # an incomplete folder from an older, interrupted layout
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.exists():
                raise
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def ensure_synthetic_corpus(
    cache_dir: str | Path | None = None, *, actors: int = 24, sample_rate: int = 16000, random_seed: int = 0
) -> Path:
    """Generate the synthetic corpus (all eight emotions) once and reuse it afterwards.

    It is written to a temporary folder that is renamed into place when complete (``write_complete``),
    so an interrupted run never leaves a half-written corpus or a temporary folder behind.
    """
    root = default_synthetic_root(cache_dir, actors=actors, sample_rate=sample_rate, random_seed=random_seed)
    if (root / COMPLETE_MARKER).exists():
        return root
    log.info("generating the synthetic corpus (%d actors, %d Hz, random seed %d) in %s", actors, sample_rate,
             random_seed, root)

    def write(folder: Path) -> None:
        synthesize_corpus(folder, actors=actors, sample_rate=sample_rate, random_seed=random_seed)
        (folder / COMPLETE_MARKER).write_text(f"generator version {GENERATOR_VERSION}\n")

    write_complete(root, write, replace_incomplete=True)
    if not (root / COMPLETE_MARKER).exists():
        raise DataError(f"{root}: a synthetic corpus folder without {COMPLETE_MARKER}; remove it to generate it again")
    return root


def synth_main(argv: list[str]) -> None:
    """Write a synthetic corpus in the layout of RAVDESS (default) or another corpus.

    The corpus is written to a temporary folder and renamed to OUT_DIR when complete: an interrupted
    run leaves neither a partial corpus nor its temporary folder.
    """
    from .records import resolve_emotions

    parser = CommandParser(prog="python -m ser_lightning synth", description=synth_main.__doc__)
    parser.add_argument("out_dir", type=Path, help="the corpus folder to create (new or empty)")
    parser.add_argument("--layout", choices=LAYOUTS, default="ravdess", help="the corpus whose file layout to write")
    parser.add_argument("--actors", type=int,
                        help="number of speakers (default: 24 for ravdess, the corpus's own default otherwise)")
    parser.add_argument("--emotions", default="all", help="'all', 'default' or a comma-separated list of names")
    parser.add_argument("--sample_rate", type=int, default=16000)
    parser.add_argument("--random_seed", type=int, default=0, help="another value gives other voices and files")
    args = parser.parse_args(argv)
    emotions = resolve_emotions(args.emotions, option="--emotions")
    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        raise UsageError(f"synth: {args.out_dir} exists and is not an empty folder; give a new folder")
    written: list[Path] = []

    def write(folder: Path) -> None:
        written.extend(synthesize_corpus(folder, actors=args.actors, emotions=emotions, sample_rate=args.sample_rate,
                                         random_seed=args.random_seed, layout=args.layout))

    if not write_complete(args.out_dir, write):
        raise UsageError(f"synth: {args.out_dir} was created by another process meanwhile; nothing written")
    print(f"wrote {len(written)} files to {args.out_dir}")
