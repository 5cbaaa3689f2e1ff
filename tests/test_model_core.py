"""Model core: CBP, reader, memory lifecycle, loss, gradients, export form, checkpoints (issues 2, 10, 11)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dmf.checkpoint import CheckpointError
from dmf.checkpoint import CheckpointError
from dmf.config import preset
from dmf.fusion import CompactBilinearPooling, MemoryReader, TopKPool, WrittenMemory
from dmf.loss import DMFObjective, dmf_loss, memory_similarity
from dmf.model import DMFModel, export_form

TEXTS = ["i am so happy today", "this is outrageous and i am furious", "i miss her so much",
         "i went to the store on tuesday"]


def tiny_model(**overrides) -> DMFModel:
    torch.manual_seed(0)
    cfg = preset("tiny", max_audio_samples=8000, **overrides)
    return DMFModel(cfg, texts=TEXTS, pretrained=False)


def batch(model: DMFModel, size: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    audio = torch.randn(size, model.model_config.max_audio_samples, generator=gen)
    tok = model.tokenizer([TEXTS[i % len(TEXTS)] for i in range(size)], padding="max_length",
                          max_length=model.model_config.max_tokens, truncation=True, return_tensors="pt")
    labels = torch.arange(size) % model.model_config.num_labels
    return audio, tok["input_ids"], tok["attention_mask"], labels


# ------------------------------------------------------------------------------------------- CBP
def test_cbp_equals_its_definition():
    d, D = 6, 8
    cbp = CompactBilinearPooling(d, D, seed=3)
    x, y = torch.randn(2, d, dtype=torch.float64), torch.randn(2, d, dtype=torch.float64)
    expected = torch.zeros(2, D, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            k = (int(cbp.hash1[i]) + int(cbp.hash2[j])) % D
            expected[:, k] += x[:, i] * y[:, j] * cbp.sign1[i].double() * cbp.sign2[j].double()
    got = cbp(x.float(), y.float()).double()
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("d,D", [(6, 8), (32, 64), (768, 1024)])
def test_cbp_dft_matrix_form_equals_fft_form(d, D):
    cbp = CompactBilinearPooling(d, D, seed=0)
    x, y = torch.randn(5, d), torch.randn(5, d)
    fft_form = cbp(x, y)
    cbp.use_dft_matrices = True
    dft_form = cbp(x, y)
    rel = (dft_form - fft_form).norm() / fft_form.norm()
    assert rel <= 1e-5, rel


# ---------------------------------------------------------------------------------------- reader
def test_reader_weights_sum_to_one_and_temperature_is_clamped():
    reader = MemoryReader(slots=16, tau_min=1e-4, tau_max=10.0)
    memory = torch.randn(16, 32)
    for scale in (1e-6, 1.0, 1e6):  # drive |Linear(s)| to both clamps
        x = torch.randn(4, 32) * scale
        for training in (True, False):
            reader.train(training)
            w = reader.read_weights(x, memory)
            assert torch.allclose(w.sum(-1), torch.ones(4), atol=1e-5)
            assert torch.isfinite(w).all()
        tau = reader.temperature_of(x, memory)
        assert (tau >= 1e-4).all() and (tau <= 10.0).all()
    # the read itself runs at the clamped tau (temperature_of is a separate copy of the formula)
    reader.eval()
    x = torch.randn(2, 32)
    scores = x @ memory.T
    for weight, bias, tau in ((0.0, 1e3, 10.0), (0.0, 0.0, 1e-4), (1e3, 0.0, 10.0)):
        with torch.no_grad():
            reader.temperature.weight.fill_(weight)
            reader.temperature.bias.fill_(bias)
        assert torch.allclose(reader.temperature_of(x, memory), torch.full((2, 1), tau))
        expected = torch.softmax(scores.double() / tau, -1).float()
        assert torch.allclose(reader.read_weights(x, memory), expected, atol=1e-5), (weight, bias)


def test_reader_eval_is_deterministic_training_is_stochastic():
    reader = MemoryReader(slots=16, tau_min=1e-4, tau_max=10.0)
    x, memory = torch.randn(3, 32), torch.randn(16, 32)
    reader.eval()
    assert torch.equal(reader(x, memory), reader(x, memory))
    expected = torch.softmax((x @ memory.T) / reader.temperature_of(x, memory), -1) @ memory
    assert torch.allclose(reader(x, memory), expected, atol=1e-6)
    reader.train()
    assert not torch.equal(reader(x, memory), reader(x, memory))  # Gumbel noise


@pytest.mark.parametrize("scale_rows", [True, False])
def test_topk_pool_keeps_k_best_rows_and_their_gates(scale_rows):
    pool = TopKPool(dim=4, k=2, scale_rows=scale_rows)
    rows = torch.randn(5, 4)
    scores = rows @ pool.projection / pool.projection.norm()
    best = torch.topk(scores, 2).indices
    out = pool(rows)
    assert out.memory.shape == (2, 4) and out.gate.shape == (2,)
    assert torch.allclose(out.gate, torch.sigmoid(scores[best]))
    expected = rows[best] * torch.sigmoid(scores[best])[:, None] if scale_rows else rows[best]  # gPool's scaling
    assert torch.allclose(out.memory, expected)


# ------------------------------------------------------------------------------ memory lifecycle
def test_eval_forward_never_changes_memory():
    model = tiny_model().eval()
    before = {k: v.clone() for k, v in model.memory_state.items()}
    audio, ids, mask, _ = batch(model)
    with torch.no_grad():
        for _ in range(3):
            model(audio, ids, mask)
    for key, value in model.memory_state.items():
        assert torch.equal(value, before[key])


def test_training_forward_writes_memory_only_when_next_step_begins():
    model = tiny_model().train()
    audio, ids, mask, labels = batch(model)
    m0 = model.memory_state["memory_audio"].clone()
    _, written = model.training_forward(audio, ids, mask)
    assert torch.equal(model.memory_state["memory_audio"], m0)  # still the old state
    assert not torch.allclose(written[0].memory, m0)
    pending = written[0].memory.detach().clone()
    model(audio, ids, mask)  # a plain training-mode forward reads, never writes
    assert torch.equal(model.memory_state["memory_audio"], m0)
    model.training_forward(audio, ids, mask)  # next step begins: pending state written first
    assert torch.allclose(model.memory_state["memory_audio"], pending)
    assert not model.memory_state["memory_audio"].requires_grad


@pytest.mark.parametrize("fusion", ["memory", "naive"])
def test_forward_returns_one_tensor_in_training_and_eval(fusion):
    model = tiny_model(fusion=fusion)
    audio, ids, mask, _ = batch(model)
    for training in (True, False):
        out = model.train(training)(audio, ids, mask)
        assert type(out) is torch.Tensor and out.shape == (4, 4)


def test_memory_is_a_buffer_not_a_parameter():
    model = tiny_model()
    names = {n for n, _ in model.named_parameters()}
    assert not any("memory_audio" in n or "memory_text" in n for n in names)
    assert "fusion.memory_audio" in model.state_dict()


# ------------------------------------------------------------------------------------------ loss
def test_loss_equals_hand_computed_value():
    log_probs = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1]]))
    labels = torch.tensor([0, 2])
    m_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cosines: 0, 1/sqrt2, 1/sqrt2
    m_t = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0]])  # cosines: -1, 1, -1
    nll = -(torch.log(torch.tensor(0.7)) + torch.log(torch.tensor(0.2))) / 2
    sim = (0 + 2 / 2 ** 0.5) / 3 + (-1 + 1 - 1) / 3
    equal = torch.full((3,), 0.5)  # equal gates: the gated mean is the paper's plain mean
    written = (WrittenMemory(m_a, equal), WrittenMemory(m_t, equal))
    for gated in (False, True):
        out = dmf_loss(log_probs, labels, written, similarity_weight=1.0, gated=gated)
        assert torch.allclose(out.total, nll + sim, atol=1e-6)
        assert torch.allclose(out.similarity, torch.tensor(sim), atol=1e-6)
    half = dmf_loss(log_probs, labels, written, similarity_weight=0.5)
    assert torch.allclose(half.total, nll + 0.5 * sim, atol=1e-6)
    assert torch.allclose(memory_similarity(m_a), torch.tensor(2 / 2 ** 0.5 / 3), atol=1e-6)
    # with gates, the value stays the paper's; the gates get the gradient of the gate-weighted mean
    # sum g_i g_j c_ij / sum g_i g_j: pairs (0,1), (0,2), (1,2) with cosines c = (0, 1/sqrt2, 1/sqrt2)
    gate = torch.tensor([1.0, 1.0, 0.5], requires_grad=True)
    gated = memory_similarity(m_a, gate)
    assert torch.allclose(gated, memory_similarity(m_a), atol=1e-7)
    gated.backward()
    g, c = gate.detach(), torch.tensor([0.0, 2 ** -0.5, 2 ** -0.5])
    w = torch.stack([g[0] * g[1], g[0] * g[2], g[1] * g[2]])
    mean = (w * c).sum() / w.sum()
    dw = (c - mean) / w.sum()  # d mean / d w_pair
    expected = torch.stack([dw[0] * g[1] + dw[1] * g[2], dw[0] * g[0] + dw[2] * g[2], dw[1] * g[0] + dw[2] * g[1]])
    assert torch.allclose(gate.grad, expected, atol=1e-6), (gate.grad, expected)
    assert gate.grad[2] > 0  # slot 2 is the one similar to the others: gradient descent lowers its gate
    assert torch.equal(dmf_loss(log_probs, labels, None).total, dmf_loss(log_probs, labels, None).nll)


# ------------------------------------------------------------------------------------- gradients
def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad for n, p in model.named_parameters()}


def _has_grad(grads, prefix):
    hits = [g for n, g in grads.items() if n.startswith(prefix)]
    assert hits, f"no parameters under {prefix}"
    return any(g is not None and g.abs().sum() > 0 for g in hits)


@pytest.mark.parametrize("detach", [False, True])
def test_gradients_flow_where_the_paper_says(detach):
    model = tiny_model(writer_detach=detach).train()
    audio, ids, mask, labels = batch(model, size=4)
    log_probs, written = model.training_forward(audio, ids, mask)
    nll = F.nll_loss(log_probs, labels)
    sim = sum(memory_similarity(w.memory, w.gate) for w in written)

    g = _grads(model, nll)
    for part in ("audio_encoder.wav2vec2.encoder", "text_encoder.bert.encoder", "fusion.read_text",
                 "fusion.read_audio", "fusion.composer", "classifier"):
        assert _has_grad(g, part), part
    assert not _has_grad(g, "fusion.write_audio") and not _has_grad(g, "fusion.write_text")

    g = _grads(model, sim)
    assert _has_grad(g, "fusion.write_audio") and _has_grad(g, "fusion.write_text")
    assert not _has_grad(g, "classifier") and not _has_grad(g, "fusion.composer")
    # the writer's input: detached, the similarity loss stops at the writer; attached (the paper's
    # end-to-end reading, the default), it also trains the encoders
    for encoder in ("audio_encoder.wav2vec2.encoder", "text_encoder.bert.encoder"):
        assert _has_grad(g, encoder) == (not detach), encoder

    frozen = [n for n, p in model.named_parameters()
              if "feature_extractor" in n or "bert.embeddings" in n]
    assert frozen and all(not model.get_parameter(n).requires_grad for n in frozen)


@pytest.mark.parametrize("fusion,in_dim", [("naive", 64), ("audio", 32), ("text", 32)])
def test_baselines_share_the_classifier_head(fusion, in_dim):
    model = tiny_model(fusion=fusion).eval()
    assert model.classifier.mlp[0].in_features == in_dim
    assert model.uses_audio == (fusion != "text") and model.uses_text == (fusion != "audio")
    audio, ids, mask, _ = batch(model)
    out = model(audio, ids, mask)
    assert out.shape == (4, 4)
    assert torch.allclose(out.exp().sum(-1), torch.ones(4), atol=1e-5)


def test_projection_maps_encoder_dims_to_fusion_dim():
    model = tiny_model(audio_dim=24)
    assert model.audio_projection.in_features == 24 and model.audio_projection.out_features == 32
    audio, ids, mask, _ = batch(model)
    assert model.eval()(audio, ids, mask).shape == (4, 4)


def test_export_form_keeps_outputs_and_is_undone_after_the_block():
    model = tiny_model().train()
    audio, ids, mask, _ = batch(model)
    with torch.no_grad():
        ref = model.eval()(audio, ids, mask)
        model.train()
        with export_form(model) as exported:
            assert exported is model and not model.training
            assert model.fusion.composer.cbp.use_dft_matrices
            assert _group_norm_types(model) == {"ExportableGroupNorm"}
            out = model(audio, ids, mask)
    assert torch.allclose(ref, out, atol=1e-5)
    assert model.training and not model.fusion.composer.cbp.use_dft_matrices  # restored
    assert _group_norm_types(model) == {"GroupNorm"}
    with pytest.raises(RuntimeError, match="boom"), export_form(model):
        raise RuntimeError("boom")
    assert model.training and _group_norm_types(model) == {"GroupNorm"}  # restored on error too


def _group_norm_types(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}


# ----------------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip_with_memory(tmp_path):
    model = tiny_model().train()
    audio, ids, mask, labels = batch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    objective = DMFObjective(model)
    for _ in range(3):  # move memory and weights away from their init
        objective(audio, ids, mask, labels).total.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    path = model.save_pretrained(tmp_path / "ckpt")
    loaded = DMFModel.from_pretrained(path)
    for key, value in model.memory_state.items():
        assert torch.equal(loaded.memory_state[key], value)
    with torch.no_grad():
        assert torch.equal(model(audio, ids, mask), loaded(audio, ids, mask))
    assert loaded.config == model.config
    saved = json.loads((path / "config.json").read_text())
    assert saved["model"]["audio_encoder_config"]["hidden_size"] == 32
    assert {"model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in path.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        DMFModel.from_pretrained(tmp_path / "nope")
    model = tiny_model(fusion="naive")
    path = model.save_pretrained(tmp_path / "ckpt")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt checkpoint weights .*model.safetensors"):
        DMFModel.from_pretrained(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="weights missing"):
        DMFModel.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint config"):
        DMFModel.from_pretrained(path)


def test_checkpoint_with_other_architecture_is_refused(tmp_path):
    a = tiny_model().save_pretrained(tmp_path / "a")
    b = tiny_model(fusion="naive").save_pretrained(tmp_path / "b")
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not match"):
        DMFModel.from_pretrained(a)


def test_dft_matrices_follow_loaded_sketches():
    model = tiny_model().eval()
    cbp = model.fusion.composer.cbp
    with torch.no_grad():  # a checkpoint whose sketches differ from what the seed gives
        cbp.sketch1.copy_(cbp.sketch1.roll(1, dims=1))
    audio, ids, mask, _ = batch(model)
    with torch.no_grad():
        ref = model(audio, ids, mask)
        with export_form(model):
            out = model(audio, ids, mask)
    assert torch.allclose(ref, out, atol=1e-5)


def test_exportable_group_norm_equals_group_norm_and_keeps_parameters():
    from dmf.model import ExportableGroupNorm, _swap_group_norms

    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(4, 4).eval()
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ref.weight.requires_grad_(False)
    holder = torch.nn.Sequential(ref)
    undo = _swap_group_norms(holder)
    swapped = holder[0]
    assert isinstance(swapped, ExportableGroupNorm) and swapped.weight is ref.weight
    assert not swapped.weight.requires_grad  # frozen stays frozen
    x = torch.randn(3, 4, 15999) * 3 + 5  # odd length, offset mean: the cases a plain mean drifts on
    assert torch.allclose(swapped(x), torch.nn.functional.group_norm(x, 4, ref.weight, ref.bias), atol=1e-5)
    assert undo == [(holder, "0", ref)]
