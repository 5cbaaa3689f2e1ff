"""dmf.preprocess: the numpy pipeline must give the numbers transformers gives, and reject bad input."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import soxr

from dmf.preprocess import AudioError, TextEncoder, TextError, load_audio, prepare_audio, preprocess_audio

SR = 16000


def _tone(seconds: float, rate: int = SR, channels: int = 0, seed: int = 0) -> np.ndarray:
    """A decaying tone plus noise: (frames,) or (frames, channels) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * np.exp(-t) + 0.05 * rng.standard_normal(t.size) + 0.02)
    x = x.astype(np.float32)
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1) if channels else x


def _wav(data: np.ndarray, rate: int = SR, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _feature_extractor(mono16k: np.ndarray, num_samples: int = 80000) -> np.ndarray:
    from transformers import Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=False)
    out = fe(mono16k, sampling_rate=SR, padding="max_length", max_length=num_samples, truncation=True,
             return_tensors="np")
    return out["input_values"][0]


# -------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("seconds", [1.3, 5.0, 7.2])  # padded, exact, cropped
def test_prepare_matches_wav2vec2_feature_extractor(seconds):
    x = _tone(seconds)
    ours = prepare_audio(x, SR)
    assert ours.shape == (80000,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _feature_extractor(x), atol=1e-5)


def test_resampled_input_matches_feature_extractor_on_resampled_mono():
    stereo = _tone(2.0, rate=44100, channels=2)
    mono16k = soxr.resample(stereo.mean(axis=1), 44100, SR).astype(np.float32)
    np.testing.assert_allclose(prepare_audio(stereo, 44100), _feature_extractor(mono16k), atol=1e-5)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_any_rate_resamples_to_80000_samples(rate):
    out = preprocess_audio(_wav(_tone(6.0, rate=rate), rate))
    assert out.shape == (80000,) and np.isfinite(out).all()
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-3


def test_short_clip_is_zero_padded_at_the_end():
    out = prepare_audio(_tone(1.0), SR, normalize=False)
    assert out.shape == (80000,)
    assert np.all(out[16000:] == 0) and np.any(out[:16000] != 0)


def test_keeps_the_first_five_seconds():
    x = _tone(7.0)
    np.testing.assert_array_equal(prepare_audio(x, SR, normalize=False), x[:80000])


def test_stereo_downmix_is_channel_mean():
    stereo = _tone(2.0, channels=2)
    data, rate = load_audio(_wav(stereo, subtype="FLOAT"))
    assert data.shape == (32000, 2) and rate == SR
    np.testing.assert_allclose(prepare_audio(data, rate), prepare_audio(stereo.mean(axis=1), SR), atol=1e-6)


def test_load_audio_sources_agree(tmp_path):
    wav = _wav(_tone(1.0))
    path = tmp_path / "a.wav"
    path.write_bytes(wav)
    from_path, _ = load_audio(path)
    from_str, _ = load_audio(str(path))
    from_bytes, _ = load_audio(wav)
    from_file, _ = load_audio(io.BytesIO(wav))
    for other in (from_str, from_bytes, from_file):
        np.testing.assert_array_equal(from_path, other)
    assert from_path.dtype == np.float32 and from_path.shape == (16000,)
    arr, rate = load_audio(from_path, sample_rate=SR)
    assert rate == SR and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, from_path)  # an array source comes back unchanged


def test_numpy_source_needs_sample_rate():
    with pytest.raises(AudioError, match="sample_rate is required"):
        load_audio(np.zeros(100, dtype=np.float32))


def test_silence_gives_finite_zeros():
    out = prepare_audio(np.zeros(SR, dtype=np.float32), SR)
    assert np.isfinite(out).all() and np.all(out == 0)


@pytest.mark.parametrize("data, rate, match", [
    (np.zeros(0, dtype=np.float32), SR, "empty"),
    (np.zeros(1000, dtype=np.float32), SR, "shorter than the 0.1 s minimum"),
    (np.full(SR, np.nan, dtype=np.float32), SR, "NaN"),
    (np.concatenate([np.zeros(SR), [np.inf]]).astype(np.float32), SR, "Inf"),
    (np.zeros((SR, 2, 2), dtype=np.float32), SR, "shape"),
    (np.zeros(SR, dtype=np.float32), 0, "sample rate"),
])
def test_prepare_rejects_bad_audio(data, rate, match):
    with pytest.raises(AudioError, match=match) as info:
        prepare_audio(data, rate)
    assert "\n" not in str(info.value)


def test_max_seconds():
    with pytest.raises(AudioError, match="longer than the 3 s maximum"):
        prepare_audio(_tone(4.0), SR, max_seconds=3)


def test_truncated_wav_bytes():
    wav = _wav(_tone(1.0))
    for cut in (30, 44, 20000):
        with pytest.raises(AudioError, match="<bytes>") as info:
            load_audio(wav[:cut])
        assert "\n" not in str(info.value)


def test_not_audio(tmp_path):
    with pytest.raises(AudioError, match=r"<bytes>: not readable audio"):
        load_audio(b"this is not a wav file at all" * 10)
    bad = tmp_path / "notes.wav"
    bad.write_text("hello")
    with pytest.raises(AudioError, match="notes.wav"):
        preprocess_audio(bad)
    with pytest.raises(AudioError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")


def test_preprocess_names_the_file_when_too_short(tmp_path):
    path = tmp_path / "tiny.wav"
    path.write_bytes(_wav(np.zeros(100, dtype=np.float32)))
    with pytest.raises(AudioError, match=r"tiny\.wav: audio is .* shorter"):
        preprocess_audio(path)


def test_preprocess_module_is_torch_free():
    code = ("import sys, dmf.preprocess, dmf.data, dmf.data.iemocap, dmf.data.manifest, dmf.data.synth; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------- text

SENTENCES = [
    "I went to the store on Tuesday.", "This is outrageous, I am furious!", "That is wonderful news.",
    "I miss her so much, it hurts.", "Okay, that is fine with me.", "the meeting is at three o'clock",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A BERT fast tokenizer on a WordPiece vocab trained here, and the folder it was saved to."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(SENTENCES * 3, vocab_size=150, min_frequency=1, show_progress=False)
    hf = BertTokenizerFast(tokenizer_object=wp._tokenizer)
    folder = tmp_path_factory.mktemp("tok")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("max_tokens", [30, 8])
def test_text_encoder_matches_bert_fast_tokenizer(hf_tokenizer, max_tokens):
    hf, folder = hf_tokenizer
    texts = SENTENCES + [" ".join(SENTENCES * 4), "Zyzzyva quux!"]  # truncation and unknown words
    ids, mask = TextEncoder.from_file(folder / "tokenizer.json", max_tokens=max_tokens).encode(texts)
    ref = hf(texts, padding="max_length", truncation=True, max_length=max_tokens)
    assert ids.shape == mask.shape == (len(texts), max_tokens)
    assert ids.dtype == mask.dtype == np.int64
    np.testing.assert_array_equal(ids, np.array(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(ref["attention_mask"]))
    assert mask[-1].sum() < max_tokens and mask[len(SENTENCES)].sum() == max_tokens  # padded, truncated


def test_text_encoder_from_tokenizer_object_leaves_it_unchanged(hf_tokenizer):
    from tokenizers import Tokenizer

    _, folder = hf_tokenizer
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    enc = TextEncoder(tok, 12)
    assert enc.pad_token == "[PAD]" and enc.pad_id == tok.token_to_id("[PAD]")
    assert tok.padding is None and tok.truncation is None
    ids, _ = enc.encode("That is wonderful news.")  # one string is a batch of one
    assert ids.shape == (1, 12) and ids[0, -1] == enc.pad_id


def test_text_encoder_needs_a_pad_token():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    with pytest.raises(TextError, match="no pad token"):
        TextEncoder(Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))


@pytest.mark.parametrize("bad, match", [
    ("", "text\\[1\\]: text is empty"),
    ("   \n\t", "text is empty"),
    (None, "expected a string, got NoneType"),
    (42, "expected a string, got int"),
    (b"caf\xe9 au lait", "text is not valid UTF-8"),
])
def test_text_encoder_rejects_bad_text(hf_tokenizer, bad, match):
    enc = TextEncoder.from_file(hf_tokenizer[1])
    with pytest.raises(TextError, match=match):
        enc.encode(["fine", bad])


def test_utf8_bytes_and_long_text(hf_tokenizer):
    enc = TextEncoder.from_file(hf_tokenizer[1])
    a, _ = enc.encode([b"that is wonderful news"])
    b, _ = enc.encode(["that is wonderful news"])
    np.testing.assert_array_equal(a, b)
    long_text = ("this is outrageous " * 600)[:10000]
    start = time.perf_counter()
    ids, mask = enc.encode([long_text] * 8)
    assert time.perf_counter() - start < 1.0
    assert ids.shape == (8, 30) and mask.all()
