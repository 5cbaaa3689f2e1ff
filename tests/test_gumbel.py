"""The memory reader's training read is a Gumbel-softmax (paper §2.2, dmf/fusion.py MemoryReader).

Two independent checks of the real `MemoryReader.read_weights`:
- exact: with the global generator seeded, the weights equal softmax((s + g) / tau) for the
  g = -log(-log(u)) that the same seed draws (u ~ U(0, 1), drawn here with torch.rand);
- statistical (Gumbel-max trick): argmax(s + g) ~ Categorical(softmax(s)), and argmax is the same
  for softmax((s + g) / tau) at any tau > 0, so over many training reads the argmax frequencies
  must follow softmax(s), NOT softmax(s / tau): the read runs at tau = 3 here on purpose.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dmf.fusion import MemoryReader  # noqa: E402

SLOTS, DIM = 6, 8
TAU_MIN, TAU_MAX = 1e-4, 10.0
DRAWS = 200_000  # reads in one vectorised call (a batch of DRAWS identical rows)
# Each frequency has std sqrt(p (1 - p) / DRAWS) <= 0.0012; 0.006 is 5 std of the worst slot.
FREQ_ATOL = 0.006


def _reader(seed: int = 0) -> MemoryReader:
    torch.manual_seed(seed)
    return MemoryReader(SLOTS, TAU_MIN, TAU_MAX).train()


def _gumbel_from_same_seed(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """g = -log(-log(u)) for the u that torch.rand draws after manual_seed(seed); the reader clamps
    u to [1e-10, 1 - 1e-7] so g stays finite (a float32 rand is exactly 0 with probability 2^-24)."""
    torch.manual_seed(seed)
    u = torch.rand(shape).clamp(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def test_training_read_is_softmax_of_scores_plus_the_drawn_gumbel_noise_over_tau():
    reader = _reader()
    x, memory = torch.randn(16, DIM) * 2.0, torch.randn(SLOTS, DIM)
    with torch.no_grad():
        s = x @ memory.T  # (B, n) scores
        tau = reader.temperature_of(x, memory)  # (B, 1): per-sample, learned
        assert tau.min() < tau.max()  # the per-row tau really varies, so a wrong broadcast shows
        g = _gumbel_from_same_seed(7, tuple(s.shape))
        expected = torch.softmax((s + g) / tau, dim=-1)
        torch.manual_seed(7)
        got = reader.read_weights(x, memory)
    assert g.std() > 0.5  # Gumbel(0, 1) has std pi / sqrt(6) ~ 1.28: real noise, not a small jitter
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the noise matters: without it the read is a different distribution
    assert (got - torch.softmax(s / tau, dim=-1)).abs().max() > 1e-2


def _one_row_scores(scores: torch.Tensor, tau: float) -> tuple[MemoryReader, torch.Tensor, torch.Tensor]:
    """A reader and (x, memory) whose scores x @ memory.T are exactly `scores` (memory = I), with the
    learned temperature fixed to `tau` (weight 0, bias tau)."""
    reader = _reader()
    with torch.no_grad():
        reader.temperature.weight.zero_()
        reader.temperature.bias.fill_(tau)
    memory = torch.eye(SLOTS, DIM)
    x = torch.zeros(1, DIM)
    x[0, :SLOTS] = scores
    return reader, x, memory


def test_training_argmax_frequencies_follow_softmax_of_the_scores():
    scores = torch.tensor([1.5, 0.8, 0.3, 0.0, -0.4, -1.2])
    reader, x, memory = _one_row_scores(scores, tau=3.0)
    with torch.no_grad():
        assert reader.temperature_of(x, memory).item() == pytest.approx(3.0)  # the read runs at tau = 3
        torch.manual_seed(11)
        weights = reader.read_weights(x.expand(DRAWS, DIM), memory)  # (DRAWS, n), one read per row
    freq = torch.bincount(weights.argmax(-1), minlength=SLOTS).double() / DRAWS
    target = torch.softmax(scores.double(), -1)
    assert (freq - target).abs().max() < FREQ_ATOL, (freq, target)
    # the check can tell tau apart: softmax(s / tau) is far outside the tolerance
    assert (freq - torch.softmax(scores.double() / 3.0, -1)).abs().max() > 5 * FREQ_ATOL
    # and the read is soft at this tau: the mean weight of the winning slot is well below 1
    assert weights.max(-1).values.mean() < 0.6
