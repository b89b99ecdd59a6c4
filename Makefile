# Two entry points a newcomer needs: `make run` (set up + main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup fortunes run test test-slow clean

setup: $(STAMP) fortunes

# Debian's fortunes: offline English text for the LLM experiments (robust_rlhf.llm.synthetic.corpus).
# Optional: without apt or root the experiments fall back to generated sentences and say so.
FORTUNE_DIR := /usr/share/games/fortunes
fortunes:
	@if [ ! -d $(FORTUNE_DIR) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq fortunes >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq fortunes >/dev/null 2>&1)) || \
		echo "note: could not install Debian fortunes; LLM experiments use generated sentences"; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[llm,test]"
	touch $(STAMP)

run: setup
	$(BIN)/robust-rlhf validate

test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
