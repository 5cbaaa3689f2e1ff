"""The dual memory fusion module (paper §2.2): reader, composer, writer, memory, baselines.

The paper's open points are decided in docs/design.md, 'Model decisions'.

Exportability is a switch, not a patch: `CompactBilinearPooling.use_dft_matrices` selects the
DFT-matrix form (plain MatMuls, no FFT op) that ONNX/TensorRT need; the reader's eval path is the
deterministic softmax. `dmf.model.export_form(model)` sets the switch for the length of a block.

The fusion always runs in float32, also inside a bf16 autocast region (`--precision bf16`): the
FFT has no bf16 kernel, and the memory, its reads and the writer's top-k are where bf16's 8-bit
mantissa would hurt most (scores over 120 slots, cosine similarities near 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from dmf.config import ModelConfig
from dmf.distributed import GlobalBatchNorm1d, gather_batch


class CompactBilinearPooling(nn.Module):
    """Compact bilinear pooling (Gao et al. 2016) of two d-dim vectors into D dims.

    CBP(x, y)_k = sum_ij x_i y_j s1_i s2_j [h1(i) + h2(j) = k mod D], i.e. the circular convolution
    of two count sketches, computed as irfft(rfft(Ψ1 x) * rfft(Ψ2 y)). The sketches come from a
    fixed seed and are buffers, so the DFT can be folded into constant matrices for export.
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.use_dft_matrices = False  # export switch: MatMul-only form, numerically equal
        gen = torch.Generator().manual_seed(seed)
        for name in ("1", "2"):
            h = torch.randint(out_dim, (in_dim,), generator=gen)
            s = torch.randint(2, (in_dim,), generator=gen).float() * 2 - 1
            sketch = torch.zeros(in_dim, out_dim)
            sketch[torch.arange(in_dim), h] = s
            self.register_buffer(f"hash{name}", h)  # (d,) bucket of each input dim
            self.register_buffer(f"sign{name}", s)  # (d,) ±1
            self.register_buffer(f"sketch{name}", sketch)  # (d, D) dense count-sketch matrix
        self.register_buffer("dft1", torch.empty(0), persistent=False)  # (d, 2K) sketch1 folded into rDFT
        self.register_buffer("dft2", torch.empty(0), persistent=False)  # (d, 2K)
        self.register_buffer("idft", torch.empty(0), persistent=False)  # (2K, D) inverse one-sided DFT
        self.refresh_dft_matrices()

    def refresh_dft_matrices(self) -> None:
        """Fold the CURRENT sketches into the DFT matrices (after loading a checkpoint, the sketches
        come from the file, so the matrices are rebuilt when the export form is switched on)."""
        self.dft1, self.dft2, self.idft = (m.to(self.sketch1.device) for m in self._dft_matrices())

    def _dft_matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # float64 while folding so the product matches the FFT form to float32 rounding
        D = self.out_dim
        K = D // 2 + 1
        n = torch.arange(D, dtype=torch.float64)
        k = torch.arange(K, dtype=torch.float64)
        angle = 2 * math.pi * torch.outer(n, k) / D  # (D, K)
        fwd = torch.cat([torch.cos(angle), -torch.sin(angle)], dim=1)  # (D, 2K): rfft as a matrix
        weight = torch.full((K,), 2.0, dtype=torch.float64)
        weight[0] = 1.0
        weight[-1] = 1.0  # D even: the Nyquist bin appears once
        inv = torch.cat([torch.cos(angle.T) * weight[:, None], -torch.sin(angle.T) * weight[:, None]], dim=0) / D
        fwd1 = (self.sketch1.double() @ fwd).float()
        fwd2 = (self.sketch2.double() @ fwd).float()
        return fwd1, fwd2, inv.float()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, d) -> (B, D)."""
        if self.use_dft_matrices:
            return self._forward_dft(x, y)
        fx = torch.fft.rfft(x @ self.sketch1, dim=-1)
        fy = torch.fft.rfft(y @ self.sketch2, dim=-1)
        return torch.fft.irfft(fx * fy, n=self.out_dim, dim=-1)

    def _forward_dft(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        K = self.out_dim // 2 + 1
        fx = x @ self.dft1  # (B, 2K) = [real | imag]
        fy = y @ self.dft2
        xr, xi = fx[:, :K], fx[:, K:]
        yr, yi = fy[:, :K], fy[:, K:]
        prod = torch.cat([xr * yr - xi * yi, xr * yi + xi * yr], dim=1)  # (B, 2K) complex product
        return prod @ self.idft  # (B, D)


class MemoryReader(nn.Module):
    """Cross-modal read: one modality's embedding attends over the OTHER modality's memory.

    s = x @ M^T (B, n); tau = clamp(|Linear_{n->1}(s)|, tau_min, tau_max) per sample;
    weights = Gumbel-softmax(s, tau) in training, softmax(s / tau) in eval/export; read = weights @ M.
    """

    def __init__(self, slots: int, tau_min: float, tau_max: float):
        super().__init__()
        self.temperature = nn.Linear(slots, 1)
        self.tau_min, self.tau_max = tau_min, tau_max

    def read_weights(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x: (B, d), memory: (n, d) -> attention weights (B, n), rows sum to 1."""
        scores = x @ memory.T  # (B, n)
        tau = self.temperature(scores).abs().clamp(self.tau_min, self.tau_max)  # (B, 1)
        if self.training:
            # Gumbel(0, 1) noise; clamping keeps log(-log(u)) finite at u in {0, 1}
            u = torch.rand_like(scores).clamp(1e-10, 1.0 - 1e-7)
            scores = scores - torch.log(-torch.log(u))
        return torch.softmax(scores / tau, dim=-1)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.read_weights(x, memory) @ memory  # (B, d)

    def temperature_of(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.temperature(x @ memory.T).abs().clamp(self.tau_min, self.tau_max)  # (B, 1)


class TokenSelfAttention(nn.Module):
    """Self-attention over a D vector read as T tokens of D/T, with a residual; flattened back."""

    def __init__(self, dim: int, tokens: int, heads: int):
        super().__init__()
        self.tokens = tokens
        self.attention = nn.MultiheadAttention(dim // tokens, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D = x.shape
        seq = x.reshape(B, self.tokens, D // self.tokens)  # (B, T, D/T)
        attended, _ = self.attention(seq, seq, seq, need_weights=False)
        return (seq + attended).reshape(B, D)


class Composer(nn.Module):
    """Shared CBP -> per-branch self-attention + BatchNorm -> average (paper Eq. 3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cbp = CompactBilinearPooling(cfg.embed_dim, cfg.cbp_dim, cfg.cbp_seed)
        self.attention1 = TokenSelfAttention(cfg.cbp_dim, cfg.attention_tokens, cfg.attention_heads)
        self.attention2 = TokenSelfAttention(cfg.cbp_dim, cfg.attention_tokens, cfg.attention_heads)
        self.norm1 = GlobalBatchNorm1d(cfg.cbp_dim)  # statistics of the global batch under DDP
        self.norm2 = GlobalBatchNorm1d(cfg.cbp_dim)

    def forward(self, x_a, x_at, x_ta, x_t) -> torch.Tensor:
        # p1 = CBP(x_a, x_at), p2 = CBP(x_ta, x_t) (order of audio and text kept), as one stacked
        # call: the shared CBP's sketch/DFT matrices are read once, which is most of its cost at batch 1
        pooled = self.cbp(torch.cat([x_a, x_ta]), torch.cat([x_at, x_t]))  # (2B, D)
        p1, p2 = pooled[: x_a.shape[0]], pooled[x_a.shape[0]:]
        return (self.norm1(self.attention1(p1)) + self.norm2(self.attention2(p2))) / 2


class WrittenMemory(NamedTuple):
    """What a writer produces in a training step: the new memory state and the top-k gates."""

    memory: torch.Tensor  # (n, d) the kept rows, M' of the paper (scaled by their gates unless the gate is trained)
    gate: torch.Tensor  # (n,) sigmoid(score) of each kept row; carries the gradient to the gPool projection


class TopKPool(nn.Module):
    """Differentiable top-k pooling (Graph U-Nets gPool): score y = E p / ||p||, keep the k best
    rows and their gates sigmoid(y). gPool multiplies each kept row by its gate so that whatever
    consumes the rows trains p; in DMF the only consumer within a step is the similarity loss,
    blind to row scale, so with `scale_rows=False` the gate reaches p through the loss's selection
    signal instead (`dmf.loss`): the gates are then scored on detached rows (only p learns from
    them) and the kept rows are stored unscaled, the gate selecting them."""

    def __init__(self, dim: int, k: int, scale_rows: bool = True):
        super().__init__()
        self.k = k
        self.scale_rows = scale_rows  # gPool's row * gate; False when the gate is trained through the loss
        self.projection = nn.Parameter(torch.randn(dim) / math.sqrt(dim))

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: (N, d) -> (N,) projections on the unit vector p / ||p||."""
        return rows @ self.projection / self.projection.norm()

    def forward(self, rows: torch.Tensor) -> WrittenMemory:
        """rows: (N, d), N >= k -> the k best rows (k, d), scaled by their gates if `scale_rows`,
        and their gates (k,)."""
        scores = self.scores(rows if self.scale_rows else rows.detach())  # (N,)
        top, index = torch.topk(scores, self.k)
        gate = torch.sigmoid(top)
        kept = rows[index]
        return WrittenMemory(kept * gate[:, None] if self.scale_rows else kept, gate)


class MemoryWriter(nn.Module):
    """New memory state from the old one and a mini-batch, treated as one sequence of n + m slots."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transform = nn.TransformerEncoderLayer(
            cfg.embed_dim, cfg.writer_heads, cfg.writer_ff_dim, dropout=0.0, batch_first=True)
        self.pool = TopKPool(cfg.embed_dim, cfg.memory_slots, scale_rows=not cfg.similarity_gated)

    def forward(self, memory: torch.Tensor, batch: torch.Tensor) -> WrittenMemory:
        """memory: (n, d), batch: (m, d) -> new memory (n, d) and its gates (n,)."""
        expanded = torch.cat([memory, batch], dim=0)[None]  # (1, n+m, d)
        return self.pool(self.transform(expanded)[0])


def _full_precision(x: torch.Tensor):
    """A region where autocast is off (bf16 training keeps the fusion in float32)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class DualMemoryFusion(nn.Module):
    """Two memory blocks (buffers, not parameters), two cross-modal readers, composer, two writers.

    `forward` reads the memory and fuses, in training and eval alike; it never writes. The
    training step (`DMFModel.training_forward`) also calls `write`, which computes the new memory
    states and keeps them pending; they are written into the buffers at the start of the next
    training step (paper: "assign it back ... at the beginning of the next iteration").

    The buffers hold values, so no loss of step t+1 reaches the writer of step t: the writer learns
    from the similarity term alone, and its gPool gate, whose only effect is the scale of the kept
    rows, from nothing (issue 11). With `write_through_read` the next step rebuilds the pending
    write from its saved inputs (old memory, the batch, both detached) with the current weights and
    reads that: the classification loss then reaches the writer's transformer and, through the
    gated rows' scale in the read (x M^T and weights @ M), its projection p, as gPool trains p
    from whatever consumes the pooled rows (back-propagation truncated to one step). The rebuilt
    memory is what the buffers then hold. The saved inputs travel in the trainer's resume state,
    so a resumed run continues exactly.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        gen = torch.Generator().manual_seed(cfg.cbp_seed + 1)
        for name in ("memory_audio", "memory_text"):
            slots = torch.empty(cfg.memory_slots, cfg.embed_dim)
            nn.init.xavier_normal_(slots, gain=1.0, generator=gen)
            self.register_buffer(name, slots)  # (n, d) M_a / M_t
        self.read_text = MemoryReader(cfg.memory_slots, cfg.read_temperature_min, cfg.read_temperature_max)
        self.read_audio = MemoryReader(cfg.memory_slots, cfg.read_temperature_min, cfg.read_temperature_max)
        self.composer = Composer(cfg)
        self.write_audio = MemoryWriter(cfg)
        self.write_text = MemoryWriter(cfg)
        self.writer_detach = cfg.writer_detach
        self.write_through_read = cfg.write_through_read
        self.pending_memory: tuple[torch.Tensor, torch.Tensor] | None = None  # (n, d) x2, detached
        self.pending_write: tuple[torch.Tensor, ...] | None = None  # (n, d), (m, d) per modality: to rebuild the write
        self.out_dim = cfg.cbp_dim

    def commit_pending_memory(self) -> bool:
        """Write the pending new memory into the buffers; True when there was one."""
        if self.pending_memory is None:
            return False
        with torch.no_grad():
            self.memory_audio.copy_(self.pending_memory[0])
            self.memory_text.copy_(self.pending_memory[1])
        self.pending_memory = None
        return True

    def begin_step(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Start a training step: write the pending memory into the buffers. With
        `write_through_read`, the pending write is first rebuilt with gradients, and its memories
        (M_a, M_t) (n, d) are returned for this step to read (None on the first step)."""
        rebuilt = None
        if self.write_through_read and self.pending_write is not None:
            memory_audio, batch_audio, memory_text, batch_text = self.pending_write
            self.pending_write = None
            rebuilt = self._run_writers((memory_audio, memory_text), (batch_audio, batch_text))
            self.pending_memory = (rebuilt[0].memory.detach(), rebuilt[1].memory.detach())
        self.commit_pending_memory()
        return None if rebuilt is None else (rebuilt[0].memory, rebuilt[1].memory)

    def _run_writers(self, memories: tuple[torch.Tensor, torch.Tensor], batches: tuple[torch.Tensor, torch.Tensor]
                     ) -> tuple[WrittenMemory, WrittenMemory]:
        """Both writers with autocast off: memories (M_a, M_t) (n, d), float32 batches (m, d) each."""
        with _full_precision(batches[0]):
            return self.write_audio(memories[0], batches[0]), self.write_text(memories[1], batches[1])

    def forward(self, x_a: torch.Tensor, x_t: torch.Tensor,
                memories: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x_a, x_t: (B, d) -> fused (B, D), float32. `memories` (M_a, M_t): what `begin_step`
        rebuilt, read instead of the buffers (training with `write_through_read` only)."""
        memory_audio, memory_text = memories if memories is not None else (self.memory_audio, self.memory_text)
        with _full_precision(x_a):
            x_a, x_t = x_a.float(), x_t.float()
            x_at = self.read_text(x_a, memory_text)  # text memory read with the audio embedding
            x_ta = self.read_audio(x_t, memory_audio)
            return self.composer(x_a, x_at, x_ta, x_t)

    def write(self, x_a: torch.Tensor, x_t: torch.Tensor) -> tuple[WrittenMemory, WrittenMemory]:
        """New memory states (audio, text) from the GLOBAL batch, kept pending (detached) for the next
        step: under DDP every rank computes the same new memory, so memories never drift.

        With `writer_detach` off (the default: the paper trains end to end and stops no gradient)
        the similarity loss also reaches the encoders through x_a, x_t; on, it trains the writer only."""
        if self.writer_detach:
            x_a, x_t = x_a.detach(), x_t.detach()
        with _full_precision(x_a):
            batch_audio, batch_text = gather_batch(x_a.float()), gather_batch(x_t.float())  # (m, d)
        written = self._run_writers((self.memory_audio, self.memory_text), (batch_audio, batch_text))
        self.pending_memory = (written[0].memory.detach(), written[1].memory.detach())
        if self.write_through_read:  # the buffers are overwritten in place next step: keep copies
            self.pending_write = (self.memory_audio.detach().clone(), batch_audio.detach(),
                                  self.memory_text.detach().clone(), batch_text.detach())
        return written


class ConcatFusion(nn.Module):
    """Baselines: naive concatenation of x_a and x_t, or one modality alone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mode = cfg.fusion
        self.out_dim = cfg.embed_dim * (2 if cfg.fusion == "naive" else 1)

    def forward(self, x_a: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """(B, d) each (None for an unused modality) -> (B, out_dim)."""
        if self.mode == "audio":
            return x_a
        if self.mode == "text":
            return x_t
        return torch.cat([x_a, x_t], dim=-1)


class Classifier(nn.Module):
    """x_f -> hidden (1024 -> 512, ReLU, dropout) -> log-probabilities over the classes."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], num_labels: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = width
        layers.append(nn.Linear(in_dim, num_labels))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.mlp(x), dim=-1)  # (B, num_labels)


def build_fusion(cfg: ModelConfig) -> nn.Module:
    return DualMemoryFusion(cfg) if cfg.fusion == "memory" else ConcatFusion(cfg)
