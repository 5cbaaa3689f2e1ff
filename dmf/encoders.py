"""Audio (Wav2Vec2) and text (BERT) encoders as sequence-classification models with num_labels = d.

The head's output is the embedding (x_a, x_t) of docs/design.md, 'Encoders'.
Encoders come from a Hugging Face id or
local folder (`from_pretrained`), or from a config dict alone (random init, no download). Whatever
was loaded, its full config dict is written back into the ModelConfig so a saved checkpoint
rebuilds without the hub.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from dmf.config import ModelConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Fallback alphabet so a tokenizer trained on few (or no) transcripts still covers any English text.
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()")


class EncoderError(RuntimeError):
    """An encoder could not be built or loaded; the message names the id or path."""


def _config_from_dict(values: dict, default_type: str, num_labels: int):
    from transformers import AutoConfig

    values = dict(values)
    model_type = values.pop("model_type", default_type)
    for drop in ("architectures", "id2label", "label2id", "transformers_version", "num_labels"):
        values.pop(drop, None)
    return AutoConfig.for_model(model_type, num_labels=num_labels, **values)


def build_audio_encoder(cfg: ModelConfig, pretrained: bool) -> tuple[nn.Module, dict]:
    """A Wav2Vec2-family audio classifier whose head outputs `audio_dim` values; and its config dict."""
    from transformers import AutoModelForAudioClassification

    dim = cfg.audio_dim or cfg.embed_dim
    if pretrained and cfg.audio_encoder:
        try:
            model = AutoModelForAudioClassification.from_pretrained(
                cfg.audio_encoder, num_labels=dim, ignore_mismatched_sizes=True)
        except (OSError, ValueError) as exc:
            raise EncoderError(f"cannot load audio encoder {cfg.audio_encoder!r}: {exc}") from None
    else:
        config = _config_from_dict(cfg.audio_encoder_config or {}, "wav2vec2", dim)
        model = AutoModelForAudioClassification.from_config(config)
    if cfg.freeze_feature_encoder and hasattr(model, "freeze_feature_encoder"):
        model.freeze_feature_encoder()  # the conv feature encoder stays frozen (paper §2.1)
    return model, _clean_dict(model.config.to_dict())


def build_text_encoder(cfg: ModelConfig, vocab_size: int | None, pretrained: bool) -> tuple[nn.Module, dict]:
    """A BERT-family sequence classifier with `text_dim` outputs, eager attention (exportable)."""
    from transformers import AutoModelForSequenceClassification

    dim = cfg.text_dim or cfg.embed_dim
    if pretrained and cfg.text_encoder:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                cfg.text_encoder, num_labels=dim, ignore_mismatched_sizes=True, attn_implementation="eager")
        except (OSError, ValueError) as exc:
            raise EncoderError(f"cannot load text encoder {cfg.text_encoder!r}: {exc}") from None
    else:
        values = dict(cfg.text_encoder_config or {})
        if vocab_size is not None:
            values["vocab_size"] = vocab_size
        config = _config_from_dict(values, "bert", dim)
        config._attn_implementation = "eager"  # SDPA defeats ORT's attention fusion (docs/design.md)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    if cfg.freeze_text_embeddings:
        base = getattr(model, model.base_model_prefix, model)
        for param in base.embeddings.parameters():
            param.requires_grad_(False)
    return model, _clean_dict(model.config.to_dict())


def _clean_dict(values: dict) -> dict:
    """Config dict minus what is rebuilt anyway (labels) or is not JSON-portable."""
    drop = {"id2label", "label2id", "transformers_version", "architectures", "_name_or_path", "torch_dtype",
            "dtype", "_attn_implementation_autoset", "num_labels", "problem_type"}
    return {k: v for k, v in values.items() if k not in drop and not k.startswith("_")}


def build_tokenizer(cfg: ModelConfig, texts: Iterable[str] | None = None, vocab_size: int = 2000):
    """The text encoder's tokenizer: from the hub id/folder, or a WordPiece vocabulary trained on
    `texts` (random-init encoders have none) wrapped as a BERT tokenizer."""
    from transformers import AutoTokenizer, BertTokenizer

    if cfg.text_encoder and cfg.text_encoder_config is None:
        try:
            return AutoTokenizer.from_pretrained(cfg.text_encoder)
        except (OSError, ValueError) as exc:
            raise EncoderError(f"cannot load tokenizer {cfg.text_encoder!r}: {exc}") from None
    return BertTokenizer(vocab=train_wordpiece_vocab(texts or [], vocab_size))


def train_wordpiece_vocab(texts: Iterable[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary that is a pure function of `texts`: special tokens, every character
    (as word start and as ##continuation, so any text tokenises), then whole words by (-count, word).
    (tokenizers' WordPieceTrainer breaks frequency ties in hash order: other ids on every call,
    so equal seeds would not give equal runs.)"""
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted(set(ALPHABET) | {c for word in counts for c in word})
    base = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    known = set(base)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in known]
    return {token: i for i, token in enumerate((base + words)[:max(vocab_size, len(base))])}


def build_feature_extractor(cfg: ModelConfig, pretrained: bool, given=None) -> tuple[object, dict]:
    """The audio feature extractor that travels with a checkpoint, and the normalisation it implies
    as ModelConfig fields {"do_normalize", "normalize_over"}.

    It is `given` (a checkpoint's own), else the audio encoder's own (`preprocessor_config.json` of
    the hub id or folder) when one is loaded, else transformers' Wav2Vec2FeatureExtractor defaults.
    A config field set explicitly (not None) overrides the extractor, which is updated to match, so
    the saved extractor always says what dmf computes."""
    from transformers import Wav2Vec2FeatureExtractor

    extractor = given
    if extractor is None and pretrained and cfg.audio_encoder:
        extractor = _encoder_feature_extractor(cfg.audio_encoder)
    if extractor is None:
        extractor = Wav2Vec2FeatureExtractor(sampling_rate=cfg.sample_rate)
    _check_feature_extractor(extractor, cfg)
    if cfg.do_normalize is not None:
        extractor.do_normalize = cfg.do_normalize
    if cfg.normalize_over is not None:
        extractor.return_attention_mask = cfg.normalize_over == "real_samples"
    resolved = {"do_normalize": bool(extractor.do_normalize),
                "normalize_over": "real_samples" if extractor.return_attention_mask else "all"}
    return extractor, resolved


def _encoder_feature_extractor(name: str):
    """The feature extractor of a hub id or local folder; None when a local folder has none."""
    from pathlib import Path

    from transformers import Wav2Vec2FeatureExtractor

    if Path(name).is_dir() and not (Path(name) / "preprocessor_config.json").is_file():
        return None
    try:
        return Wav2Vec2FeatureExtractor.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise EncoderError(f"cannot load the feature extractor of audio encoder {name!r}: {exc}") from None


def _check_feature_extractor(extractor, cfg: ModelConfig) -> None:
    """dmf's numpy pipeline (dmf.preprocess) resamples to cfg.sample_rate and pads mono with zeros."""
    rate, pad, size = (getattr(extractor, k, None) for k in ("sampling_rate", "padding_value", "feature_size"))
    if rate != cfg.sample_rate or pad != 0.0 or size != 1:
        raise EncoderError(f"audio feature extractor (sampling_rate={rate}, padding_value={pad}, feature_size={size})"
                           f" does not fit dmf's audio pipeline: expected sampling_rate={cfg.sample_rate} "
                           "(model.sample_rate), padding_value=0.0, feature_size=1")
