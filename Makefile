# `make test`: on a fresh machine, creates .venv, installs dmf with what the tests need, runs pytest.
# `make demo`: same set-up, then the one-command demo.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the release that installs as a CPU build from this machine's disk (DESIGN §6);
# an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[train,serve,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/dmf demo

clean:
	rm -rf $(VENV) build *.egg-info
