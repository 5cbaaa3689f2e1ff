"""DMFModel: encoders + fusion + classifier, and its export form.

`forward(audio, input_ids, attention_mask)` returns log-probabilities (B, C), one tensor, in
training and eval mode alike, and never writes memory. The training step calls
`training_forward`, which also runs the memory writers (`TrainingOutput`), through
`dmf.loss.DMFObjective`; the loss lives in `dmf.loss`, checkpoint I/O in `dmf.checkpoint`.
The export form (DFT-matrix CBP, two-pass GroupNorm) is taken for the length of a
`with export_form(model):` block and undone after it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dmf.checkpoint import read_checkpoint, save_checkpoint
from dmf.config import DMFConfig, ModelConfig
from dmf.encoders import build_audio_encoder, build_feature_extractor, build_text_encoder, build_tokenizer
from dmf.fusion import Classifier, DualMemoryFusion, WrittenMemory, build_fusion


class TrainingOutput(NamedTuple):
    """What a training step's forward gives the loss."""

    log_probs: torch.Tensor  # (B, C)
    written: tuple[WrittenMemory, WrittenMemory] | None  # new memories (audio, text); None for the baselines


class DMFModel(nn.Module):
    """forward(audio (B, S) float, input_ids (B, L) int64, attention_mask (B, L) int64) -> log_probs (B, C)."""

    def __init__(self, config: DMFConfig | ModelConfig, *, tokenizer=None, feature_extractor=None, texts=None,
                 pretrained: bool = True):
        super().__init__()
        config = config if isinstance(config, DMFConfig) else DMFConfig(model=config)
        cfg = config.model
        self.uses_audio = cfg.fusion != "text"
        self.uses_text = cfg.fusion != "audio"
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg, texts)
        self.feature_extractor, resolved = build_feature_extractor(cfg, pretrained, feature_extractor)
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

    @property
    def has_memory(self) -> bool:
        return isinstance(self.fusion, DualMemoryFusion)

    def encode(self, audio, input_ids, attention_mask):
        """Embeddings x_a, x_t: (B, d) each; None for a modality the fusion does not use."""
        x_a = x_t = None
        if self.uses_audio:
            x_a = self.audio_projection(self.audio_encoder(input_values=audio).logits)
        if self.uses_text:
            out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
            x_t = self.text_projection(out.logits)
        return x_a, x_t

    def forward(self, audio: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, C); reads the memory, never writes it (training mode adds the
        reader's Gumbel noise and BatchNorm's batch statistics)."""
        return self.head(*self.encode(audio, input_ids, attention_mask))

    def head(self, x_a: torch.Tensor | None, x_t: torch.Tensor | None) -> torch.Tensor:
        """Everything after the encoders (fusion + classifier): (B, d) x2 -> (B, C)."""
        return self.classifier(self.fusion(x_a, x_t))

    def training_forward(self, audio: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> TrainingOutput:
        """The training step's forward: write the memory left pending by the previous step, predict,
        and compute the new memory (kept pending for the next step; paper §2.2)."""
        memories = self.fusion.begin_step() if self.has_memory else None
        x_a, x_t = self.encode(audio, input_ids, attention_mask)
        log_probs = self.classifier(self.fusion(x_a, x_t, memories)) if memories is not None else self.head(x_a, x_t)
        return TrainingOutput(log_probs, self.fusion.write(x_a, x_t) if self.has_memory else None)

    @property
    def memory_state(self) -> dict[str, torch.Tensor] | None:
        if not self.has_memory:
            return None
        return {"memory_audio": self.fusion.memory_audio, "memory_text": self.fusion.memory_text}

    def save_pretrained(self, directory: str | Path) -> Path:
        """`dmf.checkpoint.save_checkpoint(self, directory)`."""
        return save_checkpoint(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "DMFModel":
        """The model of a checkpoint folder (`dmf.checkpoint.read_checkpoint`), in eval mode;
        `dmf.checkpoint.CheckpointError` names the file that is missing, corrupt or mismatched."""
        parts = read_checkpoint(directory, map_location)
        model = cls(parts.config, tokenizer=parts.tokenizer, feature_extractor=parts.feature_extractor,
                    pretrained=False)
        parts.check_keys(*model.load_state_dict(parts.weights, strict=False))
        return model.eval()


# ------------------------------------------------------------------------------------ export form


@contextlib.contextmanager
def export_form(model: DMFModel) -> Iterator[DMFModel]:
    """The model in its export form for the length of the block, restored afterwards (also on
    error): eval mode, CBP as DFT matrices (MatMuls, no FFT op; rebuilt from the current sketches)
    and every GroupNorm in its two-pass form (ONNX's InstanceNormalization loses ~1e-4 over
    wav2vec2's 16 000-frame first layer). Both forms equal the training forms in torch."""
    was_training = model.training
    cbp = model.fusion.composer.cbp if model.has_memory else None
    dft_before = cbp.use_dft_matrices if cbp is not None else False
    swapped = _swap_group_norms(model)
    try:
        model.eval()
        if cbp is not None:
            cbp.refresh_dft_matrices()
            cbp.use_dft_matrices = True
        yield model
    finally:
        for parent, name, original in swapped:
            setattr(parent, name, original)
        if cbp is not None:
            cbp.use_dft_matrices = dft_before
        model.train(was_training)


class ExportableGroupNorm(nn.GroupNorm):
    """nn.GroupNorm spelt out as two passes (mean, then mean squared deviation): exported, these
    are ReduceMean/Sub/Mul ops that onnxruntime and TensorRT evaluate as precisely as torch, where
    InstanceNormalization is ~100x less precise over long inputs. Same parameters as nn.GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def _swap_group_norms(root: nn.Module) -> list[tuple[nn.Module, str, nn.GroupNorm]]:
    """Replace every nn.GroupNorm (wav2vec2's first conv layer) by its two-pass form, in place;
    returns (parent, name, original) for each, to put the originals back."""
    swapped = []
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                twin = ExportableGroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
                if child.affine:  # the very same Parameters: frozen stays frozen, weights stay shared
                    twin.weight, twin.bias = child.weight, child.bias
                setattr(parent, name, twin)
                swapped.append((parent, name, child))
    return swapped


def _projection(dim: int | None, embed_dim: int) -> nn.Module:
    return nn.Identity() if dim is None or dim == embed_dim else nn.Linear(dim, embed_dim)


def parameter_groups(model: DMFModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(network params, memory-module params): the paper trains them with lr 0.01 and 0.001."""
    memory_ids = {id(p) for p in model.fusion.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return ([p for p in trainable if id(p) not in memory_ids], [p for p in trainable if id(p) in memory_ids])
