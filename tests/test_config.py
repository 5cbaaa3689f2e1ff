"""Config tree: JSON round trip, validation naming the field, presets, CLI shell (issue 2)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dmf import __version__
from dmf.config import ConfigError, DMFConfig, ModelConfig, TrainConfig, preset


@pytest.mark.parametrize("name", ["paper", "tiny"])
def test_json_round_trip(name, tmp_path):
    cfg = preset(name)
    assert DMFConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert DMFConfig.load(tmp_path / "c.json") == cfg


def test_paper_defaults_are_the_papers():
    m = preset("paper").model
    assert (m.embed_dim, m.memory_slots, m.cbp_dim, m.read_temperature_max) == (768, 120, 1024, 10.0)
    assert m.read_temperature_min == 1e-4 and m.classifier_hidden == (1024, 512)
    assert (m.sample_rate, m.max_audio_samples, m.max_tokens) == (16000, 80000, 30)
    assert m.audio_encoder == "superb/wav2vec2-base-superb-sid" and m.text_encoder == "bert-base-uncased"
    t = preset("paper").train
    assert (t.optimizer, t.lr, t.memory_lr) == ("sgd", 0.01, 0.001)
    assert t.grad_clip == 0.0 and t.precision == "fp32"  # the paper clips nothing (issue 11)
    # preprocessing from the audio encoder's own feature extractor; the writer trained end to end
    assert m.do_normalize is None and m.normalize_over is None
    assert not m.similarity_gated and not m.writer_detach
    assert preset("tiny").model.writer_detach  # the demo's measured setting
    tiny = preset("tiny").model
    assert tiny.audio_encoder is None and tiny.text_encoder is None  # no download


@pytest.mark.parametrize("section,field,value,needle", [
    ("model", "fusion", "late", "model.fusion"),
    ("model", "memory_slots", 0, "model.memory_slots"),
    ("model", "cbp_dim", 1023, "model.cbp_dim"),
    ("model", "attention_tokens", 7, "model.attention_tokens"),
    ("model", "dropout", 1.5, "model.dropout"),
    ("train", "optimizer", "rmsprop", "train.optimizer"),
    ("train", "batch_size", 1, "train.batch_size"),
    ("train", "momentum", 1.0, "train.momentum"),
    ("data", "val_fraction", 0.9, "data.val_fraction"),
    ("model", "normalize_over", "padding", "model.normalize_over"),
    ("model", "do_normalize", "yes", "model.do_normalize"),
    ("train", "precision", "fp16", "train.precision"),
    ("train", "grad_clip", -1.0, "train.grad_clip"),
])
def test_bad_value_names_field_and_range(section, field, value, needle):
    data = preset("tiny").to_dict()
    data[section][field] = value
    with pytest.raises(ConfigError, match=needle) as info:
        DMFConfig.from_dict(data)
    assert "expected" in str(info.value) and "\n" not in str(info.value)


def test_unknown_fields_and_sections_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*memory_slot"):
        DMFConfig.from_dict({"model": {"memory_slot": 3}})
    with pytest.raises(ConfigError, match="unknown config section"):
        DMFConfig.from_dict({"modle": {}})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        DMFConfig.load(tmp_path / "bad.json")


def test_configs_are_frozen_and_replace_validates():
    cfg = preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.embed_dim = 3  # type: ignore[misc]
    assert cfg.replace("train", epochs=2).train.epochs == 2
    with pytest.raises(ConfigError, match="train.epochs"):
        cfg.replace("train", epochs=0)
    assert ModelConfig().num_labels == 4 and TrainConfig().optimizer == "sgd"


def test_cli_help_and_version():
    from dmf.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"dmf {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_core_import_is_torch_free():
    code = ("import sys, dmf, dmf.config, dmf.cli; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)
