# treeseg-qgis. `make demo` and `make test` set everything up first (scripts/setup.sh).
SHELL := /bin/bash
PYTHON := .venv/bin/python
export QT_QPA_PLATFORM ?= offscreen
export HF_HUB_DISABLE_TELEMETRY := 1
PLUGIN := treeseg_qgis
VERSION := $(shell sed -n 's/^version=//p' metadata.txt)
PROFILE_PLUGINS ?= $(HOME)/.local/share/QGIS/QGIS3/profiles/default/python/plugins

.PHONY: setup demo test test-system test-qgis344 test-qgis340 lint eval bench bench-upstream-setup package deploy clean screenshot screenshot-run

setup:
	@bash scripts/setup.sh

demo: setup
	@echo "== treeseg demo: bundled NEON orthophoto resources/sample/OSBS_029.tif"
	@echo "== This machine cannot reach the Hugging Face hub, so the demo allows UNTRAINED"
	@echo "== (random) weights: it checks the whole pipeline, not the segmentation quality."
	@echo "== For a real result: accept the licence on"
	@echo "==   https://huggingface.co/facebook/dinov3-vits16plus-pretrain-lvd1689m"
	@echo "== set HF_TOKEN (or run 'hf auth login'), then drop --allow-untrained."
	$(PYTHON) -m treeseg_qgis segment resources/sample/OSBS_029.tif --out output/demo \
		--model small --allow-untrained

# The whole suite on the system's QGIS (3.22 on Debian 12, the floor metadata.txt declares) and on QGIS 3.44 LTR
# (the last Qt5 release) in a Debian 13 root beside it, then a smoke subset on QGIS 3.40 LTR in a Debian 12 root
# (scripts/qgis_root.sh VERSION: each root made once in /var/cache/treeseg-qgis<NNN>, reused afterwards).
# QGIS 4 (Qt6) is not packaged here: tests/test_qt6_real.py checks the Qt side under real PyQt6 (.venv-qt6).
test: test-system test-qgis344 test-qgis340

QGIS_VERSION_LINE := from qgis.core import Qgis; print("== the suite on QGIS", Qgis.QGIS_VERSION)
test-system: setup
	@$(PYTHON) -c '$(QGIS_VERSION_LINE)'
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

test-qgis344:
	@bash scripts/qgis_root.sh 3.44 python -c '$(QGIS_VERSION_LINE)'
	@bash scripts/qgis_root.sh 3.44 python -m pytest -q

# 3.40: what differs between QGIS versions (compat, the Qt6 gate), the plugin's load, Processing with the engine.
QGIS340_SMOKE := tests/test_compat.py tests/test_qt6_gate.py tests/test_plugin.py tests/test_processing.py
test-qgis340:
	@bash scripts/qgis_root.sh 3.40 python -c '$(subst the suite,a smoke subset,$(QGIS_VERSION_LINE))'
	@bash scripts/qgis_root.sh 3.40 python -m pytest -q $(QGIS340_SMOKE)

eval: setup
	$(PYTHON) scripts/eval_sample.py

# About an hour on 2 cores (the 400 MP raster alone takes 20 to 35 minutes); BENCH_ARGS="--sizes 4,36 --strides 16,8" for a quick run.
# Then the CPU precisions (scripts/bench_precision.py, ~15 min; PRECISION_ARGS="--quick" for ViT-S only), one 36 MP
# run with auto (int8 in ONNX Runtime) against float32 (scripts/bench_precision_e2e.py, ~10 min), then ViT-S and
# ViT-B at stride 16 on 5.7 MP against the upstream figures (scripts/bench_density.py), then a Processing batch of 10
# small rasters with the warm engine against a fresh worker per raster (scripts/bench_batch.py, ~6 min), the
# surveys, and last the product side by side with the upstream research code (scripts/bench_upstream.py, roughly
# 80 minutes under load for ViT-S and ViT-B on both sizes; UPSTREAM_ARGS="--models small --sizes crop" for a check;
# skipped with a message until `make bench-upstream-setup` has made its checkout and venv).
bench: setup
	$(PYTHON) scripts/bench.py $(BENCH_ARGS)
	$(PYTHON) scripts/bench_precision.py $(PRECISION_ARGS)
	$(PYTHON) scripts/bench_precision_e2e.py
	$(PYTHON) scripts/bench_density.py
	$(PYTHON) scripts/bench_batch.py
	$(PYTHON) scripts/bench_survey.py
	$(PYTHON) scripts/bench_upstream.py $(UPSTREAM_ARGS)

# The upstream research code at its pinned commit with its own venv, under output/bench/upstream (needs GitHub,
# or UPSTREAM_GIT / DINOV3_GIT naming local mirrors of luccahuguet/tree-seg-unsuper and facebookresearch/dinov3).
bench-upstream-setup:
	bash scripts/setup_upstream.sh

lint: setup
	.venv/bin/ruff check .

# The plugin zip: the package, metadata.txt, LICENSE, requirements.txt and resources/.
package:
	@rm -rf dist && mkdir -p dist/build/$(PLUGIN)
	@git ls-files -z --cached --others --exclude-standard $(PLUGIN) | xargs -0 -I{} cp --parents {} dist/build/
	@cp metadata.txt LICENSE requirements.txt dist/build/$(PLUGIN)/
	@cp -r resources dist/build/$(PLUGIN)/
	@cd dist/build && /usr/bin/python3 -m zipfile -c ../$(PLUGIN)-$(VERSION).zip $(PLUGIN)
	@echo dist/$(PLUGIN)-$(VERSION).zip

# Installs the zip into a QGIS profile and records this checkout's .venv as the engine.
deploy: setup package
	@mkdir -p $(PROFILE_PLUGINS)
	@rm -rf $(PROFILE_PLUGINS)/$(PLUGIN)
	@/usr/bin/python3 -m zipfile -e dist/$(PLUGIN)-$(VERSION).zip $(PROFILE_PLUGINS)
	@echo "$(CURDIR)/.venv/bin/python" > $(PROFILE_PLUGINS)/$(PLUGIN)/engine_python.txt
	@echo "installed into $(PROFILE_PLUGINS)/$(PLUGIN); engine: $(CURDIR)/.venv/bin/python"
	@echo "enable it in QGIS: Plugins > Manage and Install Plugins > Installed > TreeSeg (DINOv3)"

# docs/img/*.png (the panel, Processing, crowns, feature image, canopy height, teach) from the real QGIS
# 3.40 LTR desktop (in the root of test-qgis340) on a virtual screen (Xvfb), with the packaged plugin in a
# throw-away profile and that root's venv as the engine. screenshot-run is the part that runs in the root
# (run alone, it takes the system QGIS and .venv).
SCREEN ?= :77
SCREENSHOT_HOME := output/screenshot-qgis
ENGINE_PYTHON ?= $(CURDIR)/.venv/bin/python
screenshot: package
	@bash scripts/qgis_root.sh 3.40 make screenshot-run ENGINE_PYTHON=/opt/treeseg-venv/bin/python SCREEN=$(SCREEN)

screenshot-run:
	@rm -rf $(SCREENSHOT_HOME) && mkdir -p $(SCREENSHOT_HOME)/plugins $(SCREENSHOT_HOME)/profiles
	@/usr/bin/python3 -m zipfile -e dist/$(PLUGIN)-$(VERSION).zip $(SCREENSHOT_HOME)/plugins
	@Xvfb $(SCREEN) -screen 0 1600x1000x24 -nolisten tcp >/dev/null 2>&1 & XVFB=$$!; \
		trap 'kill $$XVFB' EXIT; sleep 1; \
		DISPLAY=$(SCREEN) QT_QPA_PLATFORM=xcb QGIS_PLUGINPATH=$(CURDIR)/$(SCREENSHOT_HOME)/plugins \
		TREESEG_ENGINE_PYTHON=$(ENGINE_PYTHON) \
		qgis.bin --nologo --noversioncheck --profiles-path $(SCREENSHOT_HOME)/profiles \
			--code scripts/screenshot.py
	@ls -l docs/img/*.png

clean:
	rm -rf output dist .pytest_cache
