# Quick start: `make demo` and `make test`. Both set up .venv on a fresh machine first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Machines without a GPU get the CPU build of torch from local disk (an unpinned torch pulls a multi-GB CUDA build).
# Machines with an NVIDIA GPU keep the torch they have (pass TORCH_SPEC= to skip the pin anywhere).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: test demo setup clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(if $(TORCH_SPEC),,--system-site-packages) $(VENV)
	$(if $(TORCH_SPEC),$(PIP) install -q $(TORCH_SPEC))
	$(PIP) install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The main job on the built-in model: four new scenes around the example product, its pixels kept exactly.
DEMO_PROMPT ?= a yellow striped mug on a marble counter in front of a sunset sky
demo: $(VENV)/.installed
	$(VENV)/bin/backdrop inpaint assets/example-product.png --product-mask assets/example-mask.png \
	  --prompt "$(DEMO_PROMPT)" --n 4 --seed 0 --steps 25 --guidance-scale 2 --out outputs/demo --overwrite

clean:
	rm -rf $(VENV) *.egg-info
