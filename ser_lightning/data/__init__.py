"""Data pipeline: corpora, robust audio loading, features, folds, cache and the DataModule."""
from .audio import AudioError, load_audio
from .corpora import CORPORA, corpus_classes, scan_corpus
from .datamodule import SERDataModule, collate_utterances
from .features import FeatureConfig, FeatureExtractor, SpecAugmentConfig, feature_stats, normalize
from .folds import FoldPlan, format_fold_plan, make_fold_plan
from .records import DEFAULT_EMOTIONS, EMOTIONS, CorpusError, Utterance, resolve_emotions
from .synth import ensure_synthetic_corpus, synthesize_corpus

__all__ = [
    "AudioError", "CORPORA", "CorpusError", "DEFAULT_EMOTIONS", "EMOTIONS", "FeatureConfig", "FeatureExtractor", "FoldPlan",
    "SERDataModule", "SpecAugmentConfig", "Utterance", "collate_utterances", "corpus_classes", "ensure_synthetic_corpus",
    "feature_stats", "format_fold_plan", "load_audio", "make_fold_plan", "normalize", "resolve_emotions",
    "scan_corpus", "synthesize_corpus",
]
