# The two commands a newcomer needs: `make demo` and `make test`. Each creates .venv if missing.
PY := .venv/bin/python
# torch and torchvision are pinned here (they come from local disk on our machines);
# users elsewhere can install the package into an environment with their own torch.
TORCH := torch==2.14.1 torchvision==0.29.1

# The oldest release the engine supports, for `make test-oldest` (PyPI's CUDA builds, about
# 3 GB; triton 3.0's CPU interpreter needs numpy 1).
OLDEST := torch==2.4.1 torchvision==0.19.1 'numpy<2'

.PHONY: demo test test-oldest lint bench clean

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

test-oldest:
	test -x .venv-oldest/bin/python || python3 -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q $(OLDEST)
	.venv-oldest/bin/python -m pip install -q -e '.[dev]' $(OLDEST)
	.venv-oldest/bin/python -m pytest -q

lint: .venv/ready
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: .venv/ready
	$(PY) benchmarks/throughput.py --quick

clean:
	rm -rf .venv .venv-oldest runs data
