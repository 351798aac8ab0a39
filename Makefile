# `make demo`: set up .venv if missing, train the recipe LT-Net and its VoxelMorph twin briefly on LPBA40,
# then score G_F, LT-Net + refinement and ANTs SyN on the validation scans (runs/demo/demo.md, demo.png).
# `make test`: set up .venv if missing, check the import layers (.importlinter), run the test suite (what CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean-demo

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/demo.py --config experiments/configs/demo_voxelmorph.yaml experiments/configs/demo.yaml --out runs/demo

test: export TF_CPP_MIN_LOG_LEVEL ?= 2
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean-demo:
	rm -rf runs/demo
