"""Skips every `gpu` / `trt`-marked test that cannot run here, with the reason from tests/gpu_skip.py.

With DMF_REQUIRE_GPU=1 (set by `make test-gpu`) a reason is an error instead: on the GPU machine a
missing package or an unusable driver must fail the run, not pass it as skips."""

from __future__ import annotations

import os

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
