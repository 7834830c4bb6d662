# The project's interface. On a fresh machine `make demo` and `make test` do all the set-up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_SPEC := torch==2.14.1 torchvision==0.29.1
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h') setup.py
NPROC  := $(shell nproc 2>/dev/null || echo 2)
# ccache's compiler links, when ccache is installed (Debian: /usr/lib/ccache)
CCACHE := $(if $(wildcard /usr/lib/ccache),/usr/lib/ccache:,)

.PHONY: install fashion-mnist demo sweep-demo test test-slow bench clean FORCE

install: $(VENV)/.built

# torch first (large, from the local wheel cache when there is one), then our deps.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q numpy tqdm matplotlib scipy ray pytest expecttest ninja
	touch $@

# The package itself, editable (its sources are used in place); the extension is built below.
$(VENV)/.editable: $(VENV)/.torch pyproject.toml
	SPARSETRAIN_SKIP_EXT=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

# The build flags (NATIVE=1: -march=native, DEBUG=1: -O0 -g; setup.py; 0 or unset: off; any other
# value is off with a warning: generic names, which an environment may set for other tools) in a
# stamp rewritten only when they changed: another flag set rebuilds the extension (ninja sees the new
# commands); the same flags leave `make -q install` up to date. Read, never written, while make
# parses this file: `make -n` and `make -q` change nothing.
$(foreach f,NATIVE DEBUG,$(if $(filter-out 0 1,$($(f))),$(warning $(f)='$($(f))' is neither 0 nor 1: off)))
BUILD_FLAGS := NATIVE=$(filter 1,$(NATIVE)) DEBUG=$(filter 1,$(DEBUG))
FLAGS_STALE := $(shell echo '$(BUILD_FLAGS)' | cmp -s - $(VENV)/.flags 2>/dev/null || echo 1)
$(VENV)/.flags: $(if $(FLAGS_STALE),FORCE)
	@mkdir -p $(VENV) && echo '$(BUILD_FLAGS)' > $@
FORCE:

# One C++ extension, built in place in a build/ directory that persists: ninja recompiles only the
# files whose sources or included headers changed (`touch csrc/cpu/prune.cpp`: that file and the
# link). The venv's ninja (pip) builds, so its log format is the one later builds and tests read.
# flock: concurrent `make install`s never run two builds in one build/ directory.
$(VENV)/.built: $(VENV)/.editable $(CSRC) $(VENV)/.flags
	flock $(VENV)/.buildlock env PATH="$(CCACHE)$(CURDIR)/$(VENV)/bin:$$PATH" MAX_JOBS=$(NPROC) \
	  NATIVE=$(filter 1,$(NATIVE)) DEBUG=$(filter 1,$(DEBUG)) $(PY) setup.py -q build_ext --inplace
	touch $@

# The quick DSD2 study (teacher -> vanilla -> distilled, ~6 min on 2 cores) on Fashion-MNIST from
# Debian's dataset-fashion-mnist when apt can install it, else torchvision downloads it.
FASHION := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@test -d $(FASHION) || (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "(dataset-fashion-mnist not installable here: torchvision will download Fashion-MNIST into data/)"

demo: install fashion-mnist
	$(PY) -m sparsetrain.experiment fashion-mnist --profile quick --out runs

# The quick noise sweep on Ray (eps 0.1 / 0.2 / 0.5: teacher + distilled student each, one run per
# core): the eps-sweep tables and figure in sweeps/paper-eps-quick-*/report (~12 min on 2 cores).
sweep-demo: install fashion-mnist
	$(PY) -m sparsetrain.sweep paper-eps --profile quick --out sweeps

test: install
	$(PY) -m pytest -q -x tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

bench: install
	$(PY) bench/kernels.py

clean:
	rm -rf build *.egg-info sparsetrain/*.so $(VENV)/.built $(VENV)/.editable $(VENV)/.flags
