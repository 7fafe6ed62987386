# The two commands: `make demo` (synthetic corpus -> curate -> pack -> latents -> train, tiny
# models, local Prefect) and `make test` (the test suite; .ci/run calls it). Both set up what is
# missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
# The first start of Prefect's local server migrates a new SQLite database: give it time.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 600

.PHONY: setup demo demo-curate test test-fast bench clean

$(VENV)/.installed: pyproject.toml constraints.txt requirements-nodeps.txt scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

setup: $(VENV)/.installed

data/synth/ground_truth.json: | setup
	$(VENV)/bin/acepipe synth data/synth --n 12 --seed 0

demo: setup data/synth/ground_truth.json
	$(VENV)/bin/acepipe pipeline --config tiny --train-config tiny --max-steps 100

demo-curate: setup data/synth/ground_truth.json
	$(VENV)/bin/acepipe run --config tiny

test: setup
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow"

clean:
	rm -rf work data/synth .cache
