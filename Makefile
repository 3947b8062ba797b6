# Two commands for a fresh clone:  `make demo` (set up + run the quickstart pipeline)
#                                  `make test` (set up + run the test suite)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is a normal dependency; this pin only picks the wheel installed first (CPU or CUDA, as pip finds it).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test setup lint clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/tokenmill run --config configs/quickstart.yaml

# Every test, the slow ones too (a plain `pytest` skips tests marked slow).
test: setup chromium
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

# The browser test drives the Prefect UI with the system Chromium (Debian packages; Playwright's own browser
# download is not used). Installed when missing and apt-get is usable (CI runs as root); else the test skips.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver ) \
	  >/dev/null 2>&1 || echo "warning: could not install chromium with apt-get; the browser test will be skipped"; }

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data
