# st-matryoshka-cache - `make` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VERSION ?= 3.3.1
VERSIONS ?=
JOBS ?= 2

# uv must see the local CPU torch wheel (pip's find-links) or it resolves a multi-GB CUDA build.
export UV_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
export SSL_CERT_FILE ?= /etc/ssl/certs/ca-certificates.crt
export HF_HUB_OFFLINE := 1

.PHONY: help
help: ## show this help
	@grep -hE '^[a-zA-Z_.-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

.PHONY: install-dev
install-dev: ## install the project's own tooling (pytest, tox, tox-uv, uv, ruff)
	$(PYTHON) -m pip install -q -r requirements-dev.txt

.PHONY: demo
demo: ## the main job: a fresh env of sentence-transformers $(VERSION), apply its series, run the conformance suite
	$(PYTHON) -m tox -r -e st-$(VERSION)

.PHONY: test
test: test-project test-conformance ## what CI runs: the project's tests, then the conformance suite on one release per minor line

.PHONY: test-project
test-project: ## the project's tests: generated files, CLI on every release (sdist + wheel), forks, numerics
	$(PYTHON) -m pytest tests -n $(JOBS) --junitxml results/project-tests.xml

.PHONY: test-conformance
test-conformance: ## the conformance suite, series applied, on the newest release of every minor line (2.4 ... 6.2)
	@status=0; $(PYTHON) -m scripts.st_patch.matrix --versions "$$($(PYTHON) -m scripts.st_patch.releases --minor-lines)" \
		|| status=$$?; $(MAKE) --no-print-directory report; exit $$status

.PHONY: test-fast
test-fast: ## the project's tests without the ones that create environments or download releases
	$(PYTHON) -m pytest tests -n $(JOBS) -m "not slow"

.PHONY: matrix
matrix: ## conformance suite per release, JOBS at a time, resumable: VERSIONS="3.3.1 5.3.0" LANE=newest|oldest|both FORCE=1 RECREATE=1
	$(PYTHON) -m scripts.st_patch.matrix --lane $(or $(LANE),newest) $(if $(VERSIONS),--versions "$(VERSIONS)") \
		$(if $(filter command line environment,$(origin JOBS)),--jobs $(JOBS)) \
		$(if $(filter-out 0,$(FORCE)),--force) $(if $(filter-out 0,$(RECREATE)),--recreate)

.PHONY: report
report: ## merge results/*.json into report/report.md (a PR comment) and report/report.html
	$(PYTHON) -m scripts.st_patch.report --results results --out report

.PHONY: series
series: ## regenerate patches/series and patches/manifest.json from patches/source and releases.toml
	$(PYTHON) -m scripts.st_patch.series

.PHONY: tox.ini
tox.ini: ## regenerate tox.ini from releases.toml
	$(PYTHON) -m scripts.st_patch.toxgen

.PHONY: readme
readme: ## regenerate the README's support table from the manifest
	$(PYTHON) -m scripts.st_patch.readme

.PHONY: check-generated
check-generated: ## fail if patches/, tox.ini or the README table differ from what their sources generate
	$(PYTHON) -m scripts.st_patch.series --check
	$(PYTHON) -m scripts.st_patch.toxgen --check
	$(PYTHON) -m scripts.st_patch.readme --check

.PHONY: lint
lint: ## ruff check + format check
	$(PYTHON) -m ruff check scripts conformance tests
	$(PYTHON) -m ruff format --check scripts conformance tests
