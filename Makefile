# treeseg-qgis. `make demo` and `make test` set everything up first (scripts/setup.sh).
SHELL := /bin/bash
PYTHON := .venv/bin/python
export QT_QPA_PLATFORM ?= offscreen
export HF_HUB_DISABLE_TELEMETRY := 1
PLUGIN := treeseg_qgis
VERSION := $(shell sed -n 's/^version=//p' metadata.txt)
PROFILE_PLUGINS ?= $(HOME)/.local/share/QGIS/QGIS3/profiles/default/python/plugins

.PHONY: setup demo test lint package deploy clean

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

test: setup
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

lint: setup
	.venv/bin/ruff check .

package:
	@rm -rf dist && mkdir -p dist/build
	@git ls-files $(PLUGIN) | grep -v '/tests/' | xargs -I{} cp --parents {} dist/build/
	@cp metadata.txt LICENSE dist/build/$(PLUGIN)/ 2>/dev/null || cp metadata.txt dist/build/$(PLUGIN)/
	@mkdir -p dist/build/$(PLUGIN)/resources && cp -r resources/* dist/build/$(PLUGIN)/resources/
	@cd dist/build && zip -qr ../$(PLUGIN)-$(VERSION).zip $(PLUGIN)
	@echo dist/$(PLUGIN)-$(VERSION).zip

deploy: package
	@mkdir -p $(PROFILE_PLUGINS)
	@rm -rf $(PROFILE_PLUGINS)/$(PLUGIN)
	@cd $(PROFILE_PLUGINS) && unzip -q $(CURDIR)/dist/$(PLUGIN)-$(VERSION).zip
	@echo "installed into $(PROFILE_PLUGINS)/$(PLUGIN): enable it in QGIS (Plugins > Manage and Install Plugins)"

clean:
	rm -rf output dist .pytest_cache
