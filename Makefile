# The two commands a fresh machine needs: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TL     := $(VENV)/bin/tl
STAMP  := $(VENV)/.tl-installed

# torch and torchvision are pinned as a pair: they come from this machine's
# local wheel store, and an unpinned torchvision can pull a mismatched torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast docs bench compile-bench head-probe imbalance keras-blog sweep-bench precision-bench two-stage clean install

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(TL) featurize recipes/quickstart.yaml
	$(TL) fit --force recipes/quickstart.yaml  # the demo owns runs/quickstart: rerunning it must work
	$(TL) evaluate recipes/quickstart.yaml

# The whole suite, kill tests, fuzz and torchrun included (CI runs exactly this).
test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# The inner loop: everything but the process-level tests (slow) and the real pretrained network (real).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not real" --durations=15

# The recipe-key reference, generated from the schema (tests/test_docs.py checks it is current).
docs: $(STAMP)
	$(PY) -c "from tlcli.config.reference import render_reference; open('docs/recipe-reference.md', 'w').write(render_reference())"

bench: $(STAMP)
	$(PY) benchmarks/bench.py

compile-bench: $(STAMP)
	$(PY) benchmarks/compile_bench.py

head-probe: $(STAMP)
	$(PY) benchmarks/head_probe.py

imbalance: $(STAMP)
	$(PY) benchmarks/imbalance.py

# tl sweep on three offline folders: its recommendation against the best candidate and the default, and its cost.
sweep-bench: $(STAMP)
	$(PY) benchmarks/sweep_bench.py

# bf16 against fp32 (computed, and stored) on four offline folders: accuracy, featurize time, export agreement.
precision-bench: $(STAMP)
	$(PY) benchmarks/precision_bench.py

keras-blog: $(STAMP)
	$(PY) benchmarks/keras_blog.py

two-stage: $(STAMP)
	$(TL) fit --force recipes/digits-two-stage.yaml
	$(TL) evaluate recipes/digits-two-stage.yaml

clean:
	rm -rf runs .tl-cache
