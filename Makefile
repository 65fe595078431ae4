# The two commands of the README. Both install what is missing first (a second run installs
# nothing), then prepare the embedded models.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lamps-installed

.PHONY: serve test install models lint

serve: install models
	$(BIN)/lamps serve

test: install models
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

install: $(STAMP)

# Reinstalls only when pyproject.toml changes.
$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV)
	touch $(STAMP)

models: install
	$(BIN)/lamps model prepare

lint: install
	$(BIN)/ruff check .
