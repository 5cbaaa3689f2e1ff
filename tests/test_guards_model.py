"""The fusion against hand-written references (issue 24, rows 1-3): the reader's clamped
temperature on the read path itself, the composer's pairing CBP(x_a, x_at) / CBP(x_ta, x_t), and the
memories `begin_step` rebuilds, in (audio, text) order.

The references below are written from the formulas, not from `dmf.fusion`'s code: count-sketch
CBP by its definition (scatter-add of x_i y_j s1_i s2_j into bucket h1(i) + h2(j) mod D), the read
as softmax((s + g) / clamp(|w . s + b|, tau_min, tau_max)) in float64. Only the composer's
self-attention and BatchNorm modules are reused (the pairing is what is under test).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dmf.config import preset  # noqa: E402
from dmf.fusion import Composer, DualMemoryFusion, MemoryReader  # noqa: E402

D_IN, SLOTS = 32, 16


# --------------------------------------------------------------------------------- references

def ref_tau(reader: MemoryReader, scores: torch.Tensor) -> torch.Tensor:
    """(B, n) float64 scores -> (B, 1) temperature, clamped to the reader's bounds."""
    w = reader.temperature.weight.detach().double()[0]  # (n,)
    b = reader.temperature.bias.detach().double()[0]
    raw = (scores * w).sum(-1, keepdim=True) + b
    return raw.abs().clamp(reader.tau_min, reader.tau_max)


def ref_read_weights(reader: MemoryReader, x: torch.Tensor, memory: torch.Tensor,
                     gumbel: torch.Tensor | None = None) -> torch.Tensor:
    s = x.double() @ memory.double().T
    noisy = s if gumbel is None else s + gumbel.double()
    return torch.softmax(noisy / ref_tau(reader, s), dim=-1)


def ref_cbp(cbp, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Count-sketch CBP from its definition, float64: out_k = sum_{h1(i)+h2(j)=k mod D} s1_i s2_j x_i y_j."""
    x, y = x.double(), y.double()
    signs = cbp.sign1.double()[:, None] * cbp.sign2.double()[None, :]  # (d, d)
    bucket = (cbp.hash1[:, None] + cbp.hash2[None, :]) % cbp.out_dim  # (d, d)
    terms = (x[:, :, None] * y[:, None, :] * signs).reshape(x.shape[0], -1)  # (B, d*d)
    out = torch.zeros(x.shape[0], cbp.out_dim, dtype=torch.float64)
    return out.index_add_(1, bucket.reshape(-1), terms)


def ref_composer(composer: Composer, x_a, x_at, x_ta, x_t) -> torch.Tensor:
    """Eq. 3 of the paper by hand: pair 1 = CBP(x_a, x_at), pair 2 = CBP(x_ta, x_t)."""
    p1 = ref_cbp(composer.cbp, x_a, x_at).float()
    p2 = ref_cbp(composer.cbp, x_ta, x_t).float()
    return (composer.norm1(composer.attention1(p1)) + composer.norm2(composer.attention2(p2))) / 2


def _gumbel(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The noise the reader draws after manual_seed(seed) (its u is clamped to [1e-10, 1 - 1e-7])."""
    torch.manual_seed(seed)
    u = torch.rand(shape).clamp(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


# ------------------------------------------------------------------------- row 1: the read path

@pytest.mark.parametrize("bias,expected_tau", [(0.0, 0.5), (0.05, 0.5), (1.3, 1.3), (40.0, 2.0), (-40.0, 2.0)])
@pytest.mark.parametrize("training", [False, True])
def test_read_weights_use_the_clamped_temperature(bias, expected_tau, training):
    """|Linear(s)| driven below tau_min, inside, and above tau_max (weight 0, bias set): the weights
    `read_weights` returns are the reference read at the clamped tau, in eval and in training."""
    torch.manual_seed(0)
    reader = MemoryReader(SLOTS, tau_min=0.5, tau_max=2.0).train(training)
    with torch.no_grad():
        reader.temperature.weight.zero_()
        reader.temperature.bias.fill_(bias)
    x, memory = torch.randn(5, D_IN) * 0.3, torch.randn(SLOTS, D_IN) * 0.3
    s = x.double() @ memory.double().T
    assert torch.allclose(ref_tau(reader, s), torch.full((5, 1), expected_tau, dtype=torch.float64))
    gumbel = _gumbel(3, (5, SLOTS)) if training else None
    torch.manual_seed(3)
    with torch.no_grad():
        got = reader.read_weights(x, memory)
    expected = ref_read_weights(reader, x, memory, gumbel)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    if bias != expected_tau:  # the clamp changed tau: the unclamped read is measurably different
        unclamped = torch.softmax(((s if gumbel is None else s + gumbel.double()) / max(abs(bias), 1e-12)), -1)
        assert not torch.allclose(unclamped, expected, atol=1e-3)


def test_read_weights_clamp_per_sample_with_a_learned_weight():
    """A real weight vector: rows of x scaled 1e-4 .. 1e4 put |Linear(s)| under, inside and over the
    bounds within one batch; every row matches the reference and the read output is weights @ M."""
    torch.manual_seed(1)
    reader = MemoryReader(SLOTS, tau_min=1e-2, tau_max=5.0).eval()
    with torch.no_grad():
        reader.temperature.bias.zero_()
    memory = torch.randn(SLOTS, D_IN)
    x = torch.randn(6, D_IN) * torch.tensor([1e-4, 1e-2, 0.3, 1.0, 1e2, 1e4])[:, None]
    tau = ref_tau(reader, x.double() @ memory.double().T)[:, 0]
    assert tau.min() == pytest.approx(1e-2) and tau.max() == pytest.approx(5.0)  # both clamps are hit
    with torch.no_grad():
        got = reader.read_weights(x, memory)
        read = reader(x, memory)
    expected = ref_read_weights(reader, x, memory)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(read.double(), expected @ memory.double(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- row 2: the composer

def _composer() -> Composer:
    torch.manual_seed(0)
    return Composer(preset("tiny").model).eval()


def test_cbp_reference_is_not_symmetric():
    """The check below can tell the pairs apart: the two sketches differ, so CBP(x, y) != CBP(y, x)."""
    cbp = _composer().cbp
    x, y = torch.randn(3, D_IN), torch.randn(3, D_IN)
    assert (ref_cbp(cbp, x, y) - ref_cbp(cbp, y, x)).abs().max() > 1e-2
    torch.testing.assert_close(cbp(x, y).double(), ref_cbp(cbp, x, y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("export", [False, True])
def test_composer_equals_the_hand_written_pairing(export):
    """The composer's output equals norm1(att1(CBP(x_a, x_at))) + norm2(att2(CBP(x_ta, x_t))) / 2
    with CBP by definition, in the FFT form and in the DFT-matrix (export) form."""
    composer = _composer()
    composer.cbp.use_dft_matrices = export
    gen = torch.Generator().manual_seed(5)
    x_a, x_at, x_ta, x_t = (torch.randn(4, D_IN, generator=gen) for _ in range(4))
    with torch.no_grad():
        got = composer(x_a, x_at, x_ta, x_t)
        expected = ref_composer(composer, x_a, x_at, x_ta, x_t)
        swapped = ref_composer(composer, x_a, x_at, x_t, x_ta)  # the second pair the other way round
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (swapped - expected).abs().max() > 1e-2


# ---------------------------------------------------------- rows 1-3: the fusion and begin_step

def _fusion(**overrides) -> DualMemoryFusion:
    torch.manual_seed(0)
    return DualMemoryFusion(preset("tiny", **overrides).model)


def ref_fusion(fusion: DualMemoryFusion, x_a, x_t, memory_audio, memory_text) -> torch.Tensor:
    """Eval forward by hand: the audio embedding reads the TEXT memory and vice versa."""
    x_at = (ref_read_weights(fusion.read_text, x_a, memory_text) @ memory_text.double()).float()
    x_ta = (ref_read_weights(fusion.read_audio, x_t, memory_audio) @ memory_audio.double()).float()
    return ref_composer(fusion.composer, x_a, x_at, x_ta, x_t)


def test_fusion_eval_forward_equals_the_reference_with_a_clamped_temperature():
    fusion = _fusion().eval()
    with torch.no_grad():
        fusion.read_text.temperature.weight.zero_()
        fusion.read_text.temperature.bias.fill_(1e3)  # far over tau_max: the clamp decides the read
    gen = torch.Generator().manual_seed(2)
    x_a, x_t = torch.randn(4, D_IN, generator=gen), torch.randn(4, D_IN, generator=gen)
    with torch.no_grad():
        got = fusion(x_a, x_t)
        expected = ref_fusion(fusion, x_a, x_t, fusion.memory_audio, fusion.memory_text)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_begin_step_returns_the_rebuilt_memories_as_audio_then_text():
    """write -> begin_step with write_through_read: the returned pair is (writer_audio(M_a, X_a),
    writer_text(M_t, X_t)) computed by hand from the memories before the step; the buffers then
    hold the same values; and a forward given them reads the text memory with the audio embedding."""
    fusion = _fusion(write_through_read=True).train()
    gen = torch.Generator().manual_seed(4)
    x_a, x_t = torch.randn(6, D_IN, generator=gen), torch.randn(6, D_IN, generator=gen)
    memory_audio, memory_text = fusion.memory_audio.clone(), fusion.memory_text.clone()
    fusion.write(x_a, x_t)
    rebuilt = fusion.begin_step()
    assert rebuilt is not None and all(m.requires_grad for m in rebuilt)  # the read can train the writer
    with torch.no_grad():
        expected = (fusion.write_audio(memory_audio, x_a).memory, fusion.write_text(memory_text, x_t).memory)
    assert (expected[0] - expected[1]).abs().max() > 1e-2
    for got, want in zip(rebuilt, expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fusion.memory_audio, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fusion.memory_text, expected[1], rtol=1e-5, atol=1e-6)
    fusion.eval()
    with torch.no_grad():
        got = fusion(x_a, x_t, tuple(m.detach() for m in rebuilt))
        want = ref_fusion(fusion, x_a, x_t, *expected)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
