# Two commands do all set-up: `make demo` (main job on the embedded default) and `make test`.
# Both create ./.venv on first use and install what they need into it.
#
# TORCH_SPEC: torch==2.13.0 resolves to the CPU build on CPU machines with a local wheel mirror.
#   Elsewhere, pick the build you want, e.g.
#     make test TORCH_INDEX=https://download.pytorch.org/whl/cpu    # CPU-only wheel
#     make demo TORCH_SPEC=torch                                    # default CUDA build on a GPU box
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.papo-installed
PYTEST_ARGS ?=

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || \
	  $(PIP) install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The demo trains PAPO-G on clock reading, the family the embedded model answers from the image about half the
# time: there RL has grounded answers to reinforce (docs/models.md). 300 steps took 4 min 37 s on 2 CPU cores.
DEMO_ARGS := --data 'synthetic:clock?size=224' --max-steps 300 \
	--set 'data.val=synthetic:clock?split=val&size=224&n=70' --set 'data.test=synthetic:clock?split=test&size=224&n=600'

demo: $(STAMP)
	$(PY) -m papo train $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
