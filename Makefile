# The two commands: `make demo` (synthetic corpus -> curate -> pack -> latents -> train, tiny
# models, local Prefect) and `make test` (the test suite; .ci/run calls it). Both set up what is
# missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
# The first start of Prefect's local server migrates a new SQLite database: give it time.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 600

.PHONY: setup demo demo-curate test test-fast mutation bench clean

$(VENV)/.installed: pyproject.toml constraints.txt requirements-nodeps.txt scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

setup: $(VENV)/.installed

data/synth/ground_truth.json: | setup
	$(VENV)/bin/acepipe synth data/synth --n 12 --seed 0

demo: setup data/synth/ground_truth.json
	$(VENV)/bin/acepipe pipeline --config tiny --train-config tiny --max-steps 100

demo-curate: setup data/synth/ground_truth.json
	$(VENV)/bin/acepipe run --config tiny

# The suite runs on one core per worker: TEST_WORKERS pytest-xdist workers, one test file each at
# a time (module fixtures are built once). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: setup
	$(VENV)/bin/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# Mutation testing of the modules where a silent bug costs most (not in CI: minutes per module).
# `make mutation MODULES=model/flow.py` for one; scripts/mutation.py --help for the options.
MUTMUT_VERSION := 3.8.1
mutation: setup
	$(PY) -c "import importlib.metadata as m; assert m.version('mutmut') == '$(MUTMUT_VERSION)'" 2>/dev/null || $(VENV)/bin/pip install -q -c constraints.txt mutmut==$(MUTMUT_VERSION)
	$(PY) scripts/mutation.py $(MODULES)

clean:
	rm -rf work data/synth .cache
