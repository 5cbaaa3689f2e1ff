"""DMFModel: encoders + fusion + classifier, the loss, and one-folder checkpoints.

A checkpoint folder holds `model.safetensors` (weights and memory buffers), `config.json` (the
whole DMFConfig, encoder configs included, so it rebuilds with no hub), and the tokenizer and
feature-extractor files. Loading never unpickles.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmf import __version__
from dmf.config import ConfigError, DMFConfig, ModelConfig
from dmf.fileio import commit_dir, stage_dir
from dmf.encoders import build_audio_encoder, build_feature_extractor, build_text_encoder, build_tokenizer
from dmf.fusion import Classifier, DualMemoryFusion, build_fusion, memory_similarity

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CHECKPOINT_FORMAT = "dmf-checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupt; the message names the file."""


class DMFModel(nn.Module):
    """forward(audio (B, S) float, input_ids (B, L) int64, attention_mask (B, L) int64)
    -> log_probs (B, C) in eval; (log_probs, new_memory | None) in training."""

    def __init__(self, config: DMFConfig | ModelConfig, *, tokenizer=None, texts=None, pretrained: bool = True):
        super().__init__()
        config = config if isinstance(config, DMFConfig) else DMFConfig(model=config)
        cfg = config.model
        self.uses_audio = cfg.fusion != "text"
        self.uses_text = cfg.fusion != "audio"
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg, texts)
        self.feature_extractor = build_feature_extractor(cfg)
        resolved = {}
        if self.uses_audio:
            self.audio_encoder, resolved["audio_encoder_config"] = build_audio_encoder(cfg, pretrained)
            self.audio_projection = _projection(cfg.audio_dim, cfg.embed_dim)
        if self.uses_text:
            vocab = len(self.tokenizer) if not (pretrained and cfg.text_encoder) else None
            self.text_encoder, resolved["text_encoder_config"] = build_text_encoder(cfg, vocab, pretrained)
            self.text_projection = _projection(cfg.text_dim, cfg.embed_dim)
        self.config = config.replace("model", **resolved)
        self.fusion = build_fusion(cfg)
        self.classifier = Classifier(self.fusion.out_dim, cfg.classifier_hidden, cfg.num_labels, cfg.dropout)

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    def encode(self, audio, input_ids, attention_mask):
        """Embeddings x_a, x_t: (B, d) each; None for a modality the fusion does not use."""
        x_a = x_t = None
        if self.uses_audio:
            x_a = self.audio_projection(self.audio_encoder(input_values=audio).logits)
        if self.uses_text:
            out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
            x_t = self.text_projection(out.logits)
        return x_a, x_t

    def forward(self, audio: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        x_a, x_t = self.encode(audio, input_ids, attention_mask)
        fused, new_memory = self.fusion(x_a, x_t)
        log_probs = self.classifier(fused)  # (B, C)
        return (log_probs, new_memory) if self.training else log_probs

    def head(self, x_a: torch.Tensor | None, x_t: torch.Tensor | None) -> torch.Tensor:
        """Everything after the encoders (fusion + classifier), eval mode: (B, d) x2 -> (B, C)."""
        fused, _ = self.fusion(x_a, x_t)
        return self.classifier(fused)

    def exportable(self, enabled: bool = True) -> "DMFModel":
        """Select the export forms: DFT-matrix CBP (no FFT op) and two-pass GroupNorm (ONNX's
        InstanceNormalization loses ~1e-4 over wav2vec2's 16 000-frame first layer). Both equal
        the training forms in torch. Call with eval()."""
        if isinstance(self.fusion, DualMemoryFusion):
            cbp = self.fusion.composer.cbp
            if enabled:
                cbp.refresh_dft_matrices()
            cbp.use_dft_matrices = enabled
        for module in self.modules():
            if isinstance(module, ExportableGroupNorm):
                module.two_pass = enabled
        if enabled:
            _swap_group_norms(self)
        return self

    @property
    def memory_state(self) -> dict[str, torch.Tensor] | None:
        if not isinstance(self.fusion, DualMemoryFusion):
            return None
        return {"memory_audio": self.fusion.memory_audio, "memory_text": self.fusion.memory_text}

    # ---------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a complete checkpoint folder atomically (built aside, then renamed into place)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        staging = stage_dir(directory)
        try:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "dmf_version": __version__})
            self.tokenizer.save_pretrained(staging)
            self.feature_extractor.save_pretrained(staging)
            meta = {"format": CHECKPOINT_FORMAT, "dmf_version": __version__, **self.config.to_dict()}
            (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
            commit_dir(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "DMFModel":
        """Rebuild from a checkpoint folder: config first (no hub), then weights and memory."""
        directory = Path(directory)
        config = load_checkpoint_config(directory)
        tokenizer = _load_tokenizer(directory)
        model = cls(config, tokenizer=tokenizer, pretrained=False)
        state = _load_weights(directory / WEIGHTS_NAME, map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}: "
                f"missing {sorted(missing)[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {sorted(unexpected)[:3]}{'...' if len(unexpected) > 3 else ''}")
        return model.eval()


class ExportableGroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose export form is spelt out as two passes (mean, then mean squared
    deviation): exported, these are ReduceMean/Sub/Mul ops that onnxruntime and TensorRT evaluate
    as precisely as torch, where InstanceNormalization is ~100x less precise over long inputs.
    Same parameters and state dict as nn.GroupNorm."""

    two_pass = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.two_pass:
            return super().forward(x)
        B, C = x.shape[:2]
        grouped = x.reshape(B, self.num_groups, -1)  # (B, G, C/G * L)
        centred = grouped - _blocked_mean(grouped)
        var = _blocked_mean(centred * centred)
        y = (centred / torch.sqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            shape = (1, C) + (1,) * (x.dim() - 2)
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


def _blocked_mean(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Mean over the last dim (B, G, N) -> (B, G, 1), summed in blocks of `block` and then across
    blocks: a plain float32 ReduceMean over N = 16 000 frames drifts by ~1e-5 relative."""
    n = x.shape[-1]
    padded = F.pad(x, (0, (-n) % block))  # zeros add nothing to the sums
    sums = padded.reshape(x.shape[0], x.shape[1], -1, block).sum(-1)  # (B, G, N/block)
    return sums.sum(-1, keepdim=True) / n


def _swap_group_norms(root: nn.Module) -> None:
    """Give every nn.GroupNorm (wav2vec2's first conv layer) its exportable form, in place."""
    for parent in root.modules():
        for name, child in parent.named_children():
            if type(child) is nn.GroupNorm:
                swapped = ExportableGroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
                if child.affine:  # the very same Parameters: frozen stays frozen, weights stay shared
                    swapped.weight, swapped.bias = child.weight, child.bias
                swapped.two_pass = True
                setattr(parent, name, swapped)


def _projection(dim: int | None, embed_dim: int) -> nn.Module:
    return nn.Identity() if dim is None or dim == embed_dim else nn.Linear(dim, embed_dim)


def load_checkpoint_config(directory: Path) -> DMFConfig:
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

    if not (directory / "tokenizer.json").is_file():
        raise CheckpointError(f"checkpoint tokenizer missing: {directory / 'tokenizer.json'}")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise CheckpointError(f"corrupt checkpoint tokenizer in {directory}: {exc}") from None


def dmf_loss(log_probs: torch.Tensor, labels: torch.Tensor, new_memory, similarity_weight: float = 1.0):
    """NLL(log_probs, labels) + w * sum over modalities of the mean upper-triangle cosine similarity
    of the new memory (DESIGN §2). Returns (total, {"nll": ..., "similarity": ...})."""
    nll = F.nll_loss(log_probs, labels)
    if new_memory is None:
        return nll, {"nll": nll.detach(), "similarity": torch.zeros(())}
    similarity = sum(memory_similarity(m) for m in new_memory)
    return nll + similarity_weight * similarity, {"nll": nll.detach(), "similarity": similarity.detach()}


def parameter_groups(model: DMFModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(network params, memory-module params): the paper trains them with lr 0.01 and 0.001."""
    memory_ids = {id(p) for p in model.fusion.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return ([p for p in trainable if id(p) not in memory_ids], [p for p in trainable if id(p) in memory_ids])
