# MirrorUnit: `make run` starts the demo, `make test` runs every test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# the board whose card image `make image`, `make image-test` and `make test` build
BOARD  ?= pi4

.PHONY: setup run test test-quick bench lint clean fuzz panel

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-system.sh scripts/apt-ensure.sh
	scripts/setup-system.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==24.3.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: setup
	$(PY) -m firmware.demo

# Every test, the card image's included: builds the image for $(BOARD) first (the Debian
# base root is cached in build/image; about 3 minutes the first time, then 1-2), so the
# image tests and the QEMU boot test run instead of skipping.
# pytest exits 5 when it collected nothing; that is a broken test tree, not a pass.
test: setup image-setup
	$(PY) -m image.build --board $(BOARD)
	MIRRORUNIT_IMAGE_BOARD=$(BOARD) MIRRORUNIT_IMAGE_REQUIRED=1 $(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$rc

# The same tests without building an image: the image tests skip unless one is built.
test-quick: setup
	$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-quick: pytest collected no tests" >&2; fi; \
	exit $$rc

lint: setup
	$(VENV)/bin/ruff check firmware tests
	$(VENV)/bin/mypy firmware

bench: setup
	$(PY) -m firmware.bench

# Coverage-guided fuzzing (atheris): every target in fuzz/ for FUZZ_RUNS inputs, one at a
# time; the summary goes to var/fuzz/summary.txt.
FUZZ_RUNS ?= 1000000
fuzz: setup
	$(PY) fuzz/run_all.py --runs $(FUZZ_RUNS) --out var/fuzz

# The front-panel controller's bundle (board/panel): every module compiled by mpy-cross
# for the RP2040 (-march=armv6m) into build/panel/*.mpy, with main.py and the vendored
# MicroPython packages (ssd1306, logging; fetched once into build/panel-vendor).
panel: setup
	$(PY) scripts/build_panel.py --out build/panel

clean:
	rm -rf var .pytest_cache

# --- SD-card image (image/, board/): `make image BOARD=pi4`, `make image-test BOARD=pi4` ---

.PHONY: image image-setup image-test

image-setup:
	image/setup.sh

image: setup image-setup
	$(PY) -m image.build --board $(BOARD)

# Boots the built image in qemu-system-aarch64 (virt, TCG) and checks the serial console.
image-test: setup image-setup
	MIRRORUNIT_IMAGE_BOARD=$(BOARD) MIRRORUNIT_IMAGE_BOOT=1 \
		$(PY) -m pytest tests/system/test_image_boot.py -q -p no:cacheprovider
