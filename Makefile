# `make demo` runs attncap on the built-in shapes world; `make test` runs the tests.
# Both create .venv on first use (and again whenever pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test install clean
demo: $(STAMP)
	$(BIN)/attncap demo

test: $(STAMP)
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }  # the browser test
	$(BIN)/python -m pytest -q -n 2 --dist worksteal  # 2 workers that share out the slow tests: 550 s on a slow 2-core AVX2 CPU (first-generation EPYC)

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v java >/dev/null || { apt-get update -qq && apt-get install -y -qq default-jre-headless; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torchvision from the registry brings the torch it was built for (a local CPU-only torch
	# wheel elsewhere on the machine would break torchvision's compiled ops).
	$(BIN)/python -m pip install -q "torchvision>=0.29"
	$(BIN)/python -m pip install -q -e ".[all,test]"  # every extra: demo and tests use them all
	$(BIN)/python -c "import torchvision.ops, attncap"
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) runs
