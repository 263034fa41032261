# rsiseg: `make demo` and `make test` bootstrap uv and .venv on a fresh machine, then run.
SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := .tools/uv/bin/uv
export UV_COMPILE_BYTECODE := 1
export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy
PY := .venv/bin/python
DEMO_DIR := runs/demo

.PHONY: install demo test test-all lint clean

$(UV):
	python3 -m pip install --quiet --disable-pip-version-check --target .tools/uv "uv==$(UV_VERSION)"

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	@touch $@

install: .venv/.synced

demo: install
	$(PY) -m rsiseg data synth --out $(DEMO_DIR)/data --images 160 --size 256 --seed 0
	$(PY) -m rsiseg train configs/demo_synth.yaml train.output_dir=$(DEMO_DIR)/train --overwrite
	$(PY) -m rsiseg eval --checkpoint $(DEMO_DIR)/train/best.pth --out $(DEMO_DIR)/eval
	$(PY) -m rsiseg predict --checkpoint $(DEMO_DIR)/train/best.pth --out $(DEMO_DIR)/predict --overwrite \
		--from-coco $(DEMO_DIR)/data/annotations/instances_val.json --images $(DEMO_DIR)/data/images --limit 4
	$(PY) tools/demo_check.py $(DEMO_DIR) --min-bbox-ap50 0.5

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

clean:
	rm -rf runs .pytest_cache

lint: install
	.venv/bin/ruff check src tests bench tools
