"""Skips every `gpu` / `trt`-marked test that cannot run here, with the reason from tests/gpu_skip.py,
and the small synthetic corpus the training tests share (`corpus_dir`, `corpus`; a module that
needs another one defines its own fixture of that name).

With DMF_REQUIRE_GPU=1 (set by `make test-gpu`) a reason is an error instead: on the GPU machine a
missing package or an unusable driver must fail the run, not pass it as skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpu_skip import skip_reason


def pytest_collection_modifyitems(config, items):
    required = os.environ.get("DMF_REQUIRE_GPU") == "1"
    for item in items:
        for marker in ("trt", "gpu"):
            reason = skip_reason(marker) if item.get_closest_marker(marker) else None
            if reason and required:
                raise pytest.UsageError(f"DMF_REQUIRE_GPU=1 but {item.nodeid} cannot run: {reason}")
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """48 utterances of `dmf synth` (seed 0) in the IEMOCAP layout."""
    from dmf.data.synth import synthesize

    path = tmp_path_factory.mktemp("corpus") / "synth"
    synthesize(path, seed=0, utterances=48)
    return path


@pytest.fixture(scope="module")
def corpus(corpus_dir):
    from dmf.data.corpus import load_corpus

    return load_corpus(corpus_dir)
