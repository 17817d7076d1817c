# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv and install everything on first use: torch first (the CPU wheel on this
# project's machines), then leandiff with its test extras, then the Fashion-MNIST Debian package.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
	  || echo "note: could not install dataset-fashion-mnist; fashion-mnist needs --data-dir"; fi
	touch $@

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n 2 tests

demo: $(STAMP)
	$(VENV)/bin/leandiff demo --out demo-out

clean:
	rm -rf $(VENV) demo-out
