"""One-folder dmf checkpoints: write and read, never unpickling.

A checkpoint folder holds `model.safetensors` (weights and memory buffers), `config.json` (the
whole DMFConfig, encoder configs and the resolved preprocessing included, so it rebuilds with no
hub), the text encoder's tokenizer files and the audio encoder's feature extractor
(`preprocessor_config.json`): copied from the encoder the model was built from, so a hub or local
encoder's own preprocessing (do_normalize, return_attention_mask) travels with every checkpoint.
`DMFModel.save_pretrained` calls `save_checkpoint`; `DMFModel.from_pretrained` assembles the model
from the parts `read_checkpoint` returns. This module never imports `dmf.model`: it reads and writes
files, the model class builds itself.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmf import __version__
from dmf.config import ConfigError, DMFConfig
from dmf.contract import TOKENIZER_FILE
from dmf.fileio import commit_dir, stage_dir

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FEATURE_EXTRACTOR_NAME = "preprocessor_config.json"
CHECKPOINT_FORMAT = "dmf-checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupt; the message names the file."""


def save_checkpoint(model, directory: str | Path) -> Path:
    """Write a complete checkpoint folder of a DMFModel atomically (built aside, then renamed in)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    staging = stage_dir(directory)
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "dmf_version": __version__})
        model.tokenizer.save_pretrained(staging)
        model.feature_extractor.save_pretrained(staging)
        meta = {"format": CHECKPOINT_FORMAT, "dmf_version": __version__, **model.config.to_dict()}
        (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        commit_dir(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


@dataclass
class CheckpointParts:
    """What a checkpoint folder holds, read and checked: enough to build the model with no hub."""

    directory: Path
    config: DMFConfig
    tokenizer: Any  # a transformers tokenizer
    feature_extractor: Any  # a Wav2Vec2FeatureExtractor
    weights: dict[str, torch.Tensor]  # state dict: parameters and memory buffers

    def check_keys(self, missing, unexpected) -> None:
        """A model built from `config` must take every weight and leave none out (`load_state_dict`'s
        missing / unexpected keys): else the weights belong to another config."""
        if missing or unexpected:
            raise CheckpointError(
                f"{self.directory / WEIGHTS_NAME} does not match {self.directory / CONFIG_NAME}: "
                f"missing {sorted(missing)[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {sorted(unexpected)[:3]}{'...' if len(unexpected) > 3 else ''}")


def read_checkpoint(directory: str | Path, map_location: str = "cpu") -> CheckpointParts:
    """The parts of a checkpoint folder: config first (no hub), then the tokenizer and feature
    extractor saved with it, then weights and memory. `DMFModel.from_pretrained` assembles them."""
    directory = Path(directory)
    config = load_checkpoint_config(directory)
    return CheckpointParts(directory, config, tokenizer=_load_tokenizer(directory),
                           feature_extractor=_load_feature_extractor(directory),
                           weights=_load_weights(directory / WEIGHTS_NAME, map_location))


def load_checkpoint_config(directory: str | Path) -> DMFConfig:
    """The DMFConfig of a checkpoint folder (its config.json), without loading weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {directory}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"not a dmf checkpoint: {path} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt checkpoint config {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not a dmf checkpoint: {path} has no \"format\": \"{CHECKPOINT_FORMAT}\"")
    try:
        return DMFConfig.from_dict({k: v for k, v in meta.items() if k in ("model", "data", "train")})
    except ConfigError as exc:
        raise CheckpointError(f"invalid checkpoint config {path}: {exc}") from None


def _load_weights(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint weights missing: {path}")
    try:
        return load_file(str(path), device=map_location)
    except Exception as exc:  # safetensors raises several types for truncated/garbled files
        raise CheckpointError(f"corrupt checkpoint weights {path}: {type(exc).__name__}: {exc}") from None


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    if not (directory / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"checkpoint tokenizer missing: {directory / TOKENIZER_FILE}")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise CheckpointError(f"corrupt checkpoint tokenizer in {directory}: {exc}") from None


def _load_feature_extractor(directory: Path):
    from transformers import Wav2Vec2FeatureExtractor

    path = directory / FEATURE_EXTRACTOR_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint feature extractor missing: {path}")
    try:
        return Wav2Vec2FeatureExtractor.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises several types for a garbled JSON file
        raise CheckpointError(f"corrupt checkpoint feature extractor {path}: {exc}") from None
