# `make test`: on a fresh machine, creates .venv, installs dmf with what the tests need, runs pytest.
# `make demo`: same set-up, then the one-command demo.
# `make test-gpu`: on a machine with an NVIDIA GPU (docs/reliability.md, "TensorRT and GPU tests").
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the release that installs as a CPU build from this machine's disk
# (docs/design.md, 'Environment');
# an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo install clean test-gpu gpu-install gpu-smoke

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[train,serve,dev,live,ray]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/dmf demo

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info

# ---------------------------------------------------------------------------------------- GPU
# Its own venv: the `gpu` extra (onnxruntime-gpu) must not share one with CPU onnxruntime, and
# `trt` brings TensorRT. torch keeps the same pin (from PyPI on such a machine: a CUDA build).
# A CUDA device means `nvidia-smi -L` lists one (as in tests/gpu_skip.py); /dev/nvidia0 is not
# used: WSL2 has /dev/dxg instead, and a container can hold the node with no driver answering.
GPU_VENV := .venv-gpu
GPU_BIN := $(GPU_VENV)/bin
GPU_STAMP := $(GPU_VENV)/.installed
NVIDIA_SMI := nvidia-smi
SMOKE := runs/gpu-smoke

test-gpu:
	@$(NVIDIA_SMI) -L 2>/dev/null | grep -q '^GPU ' || { echo "make test-gpu: no CUDA device ($(NVIDIA_SMI) -L lists no GPU); nothing installed, nothing run" >&2; exit 2; }
	@$(MAKE) --no-print-directory gpu-install
	DMF_REQUIRE_GPU=1 $(GPU_BIN)/python -m pytest -q -m "gpu or trt"
	@$(MAKE) --no-print-directory gpu-smoke

gpu-install: $(GPU_STAMP)

# `train` pulls CPU onnxruntime, which writes the same `onnxruntime` module as onnxruntime-gpu:
# uninstall it, then reinstall onnxruntime-gpu's files that the uninstall removed.
$(GPU_STAMP): pyproject.toml
	test -x $(GPU_BIN)/python || $(PY) -m venv $(GPU_VENV)
	$(GPU_BIN)/pip install -q --upgrade pip
	$(GPU_BIN)/pip install -q $(TORCH)
	$(GPU_BIN)/pip install -q -e ".[train,serve,dev,live,trt,gpu]"
	$(GPU_BIN)/pip uninstall -q -y onnxruntime
	$(GPU_BIN)/pip install -q --force-reinstall --no-deps \
		"onnxruntime-gpu==$$($(GPU_BIN)/python -c 'from importlib.metadata import version; print(version("onnxruntime-gpu"))')"
	touch $(GPU_STAMP)

# A tiny model end to end on the GPU: export a fp16 plan, predict one clip, time it.
gpu-smoke: $(GPU_STAMP)
	rm -rf $(SMOKE)
	$(GPU_BIN)/dmf synth $(SMOKE)/corpus --utterances 40
	$(GPU_BIN)/dmf train --data $(SMOKE)/corpus --out $(SMOKE)/train --preset tiny --fold 1 --fusion memory \
		--epochs 1 --no-progress
	$(GPU_BIN)/dmf export $(SMOKE)/train/fold1 --out $(SMOKE)/plan --engine trt --precision fp16 --max-batch 8
	$(GPU_BIN)/dmf predict $(SMOKE)/plan --json --text "i am so happy today" \
		--audio "$$(find $(SMOKE)/corpus -name '*.wav' | sort | head -n 1)"
	$(GPU_BIN)/dmf bench $(SMOKE)/plan --engines trt --batch-sizes 1,8 --warmup 2 --min-runs 5 --min-seconds 0.5 \
		--out $(SMOKE)/bench
