# mushcam: `make demo` and `make test` work on a fresh clone (they make .venv here and install into it).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= models/mushcam-mnv2-7sp
SHARED ?= ../shared
WORK   ?= work/shared-pool

.PHONY: help demo test pi-check model loso check-shared clean

help:
	@echo "make demo   classify the shipped sample photos with the shipped model (laptop mode, no hardware)"
	@echo "make test   run the test suite (installs the training extra: TensorFlow, about 600 MB, and the"
	@echo "            Debian packages the tests use: sshd, rsync, shellcheck, systemd, chromium, tmux)"
	@echo "make pi-check  install and run the device in an emulated Debian 12 arm64 root; compare with x86 (root)"
	@echo "make model  rebuild $(MODEL) from $(SHARED)/data/mushrooms + fungi-other, calibrated on the folds'"
	@echo "            evidence in train/shared-pool-folds.json (see docs/training.md for times)"
	@echo "make loso   leave-one-species-out folds for that recipe (4, 8-17 min each: docs/training.md), then export"
	@echo "            with them into $(MODEL) and rewrite train/shared-pool-folds.json"

# The device install: no TensorFlow, what a Pi gets.
$(VENV)/.device: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# Tests and training need the workstation extras (TensorFlow, OpenCV, pytest).
$(VENV)/.test: pyproject.toml $(VENV)/.device
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.device
	$(BIN)/mushcam run --once --camera fake:$(MODEL)/samples --model $(MODEL) --display-dir out/display
	@echo "display frames: out/display/*.png"

# The Debian packages the tests use, installed with apt-get when missing (tests/system-deps.sh says how
# when it cannot); checked again only when the script changes.
$(VENV)/.system-deps: tests/system-deps.sh
	bash tests/system-deps.sh
	@mkdir -p $(VENV) && touch $@

test: $(VENV)/.system-deps $(VENV)/.test
	$(BIN)/python -m pytest -q

# The device installed by deploy/install.sh into a Debian 12 arm64 root under qemu (work/pi-root, built
# once: about 5 min), its self-test, and its verdicts on the shipped samples against this machine's.
pi-check: $(VENV)/.device
	bash deploy/pi-check.sh

check-shared:
	@test -d $(SHARED)/data/mushrooms || { echo "error: $(SHARED)/data/mushrooms not found; set SHARED=/path/to/shared"; exit 1; }

model: $(VENV)/.test check-shared
	bash train/make_model.sh $(SHARED) $(WORK) $(MODEL)

# Leave-one-species-out folds of the recipe `make model` uses (4 folds: 33 min for the four at 288 px on a
# quiet machine, 2026-12-06; 23 min at 224 px; 12 min a 224 px fold with other jobs on the cores; reuses folds (of the same recipe) already
# trained in $(WORK)-loso), then the shipped bundle is
# exported again from $(WORK) with the folds as calibration evidence (so run `make model` first).
loso: $(VENV)/.test check-shared
	$(BIN)/mushcam-train loso $(WORK) --out $(WORK)-loso --weights $(SHARED)/weights/mobilenet_v2_1.0_224_no_top.weights.h5 \
	  --size 288 --calibration 1000 --ood-method knn --fine-tune-epochs 6 --feature-copies 4 --reuse-fits
	FROM=export LOSO=$(WORK)-loso bash train/make_model.sh $(SHARED) $(WORK) $(MODEL)

clean:
	rm -rf out work .pytest_cache
