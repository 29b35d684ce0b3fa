# The two commands users need: `make run` and `make test`. Everything installs into .venv at the project root.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench browser tools clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) requirements.lock pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m service serve

# The browser tests drive Debian's chromium; install it when missing (root on these machines).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The one-clock test runs an instance under libfaketime (Debian's faketime).
tools:
	@ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq faketime >/dev/null)

test: install browser tools
	PYTHONASYNCIODEBUG=1 $(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/queue.py
	$(PY) bench/worker.py
	$(PY) bench/e2e.py
	$(PY) bench/long.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
