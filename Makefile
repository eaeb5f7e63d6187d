# make reproduce: every notebook in the quick profile on the CPU (papermill); make test: the test suite.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install; override e.g. TORCH_SPEC="torch torchvision --index-url ..." for another CUDA.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PROFILE ?= quick
DEVICE ?= cpu

.PHONY: reproduce figures tables test install clean-runs notebooks lab

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[notebooks,test]'
	touch $@

# Data: $GEVIT_DATA_DIR when set, else ./data (downloaded on first use); checkpoints: $GEVIT_CHECKPOINT_DIR, else
# downloaded from the authors' repository.
reproduce: install
	$(PY) -m gevit_lib.reproduce --profile $(PROFILE) --device $(DEVICE)

# The committed figures/ (the gallery figures/README.md shows): every notebook at the quick profile on the CPU.
figures: install
	$(PY) -m gevit_lib.reproduce --profile quick --device cpu --out-dir figures

# The post-hoc tables of experiments 1-3 (notebooks 06-08) on the whole test split, no finetuning and head
# finetuning, on a CPU (profile tables: ~1.5 h on 2 idle cores; an interrupted run resumes) -> figures/tables/
tables: install
	$(PY) -m gevit_lib.reproduce --profile tables --device $(DEVICE) --only 06 07 08 --out-dir figures/tables

# JupyterLab on notebooks/ with this environment's Python as the kernel (installed on first use).
lab: install
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean-runs:
	rm -rf runs/*

# Regenerate every .ipynb from its reviewed .py source (outputs stripped), after editing notebooks/*.py.
notebooks: install
	$(VENV)/bin/jupytext --update --to ipynb notebooks/[0-9][0-9]_*.py  # --update keeps the cell ids
	$(VENV)/bin/jupyter nbconvert --clear-output --inplace --log-level WARN notebooks/[0-9][0-9]_*.ipynb
