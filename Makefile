# The two commands a newcomer needs: `make demo` and `make test`. Each creates .venv if missing.
PY := .venv/bin/python
# torch and torchvision are pinned here (they come from local disk on our machines);
# users elsewhere can install the package into an environment with their own torch.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

.venv/ready: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: .venv/ready
	$(PY) -m engine.run recipes/demo.yaml

test: .venv/ready lint
	$(PY) -m pytest -q

lint: .venv/ready
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: .venv/ready
	$(PY) benchmarks/throughput.py --quick

clean:
	rm -rf .venv runs data
