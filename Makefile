# Two commands are the contract with every new user: `make demo` and `make test`.
# Each builds its own virtual environment on first use. CPU torch is pinned here (the set-up
# path of this project's machines); pyproject.toml stays open (torch>=2.4) for CUDA users.
PYTHON ?= python3
VENV := .venv
DS_VENV := .venv-deepspeed
TORCH_PIN := torch==2.13.0
DEEPSPEED_PIN := deepspeed==0.19.8

.PHONY: test unit parity gpu-check demo bench bench-ds clean

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_PIN)
	$(VENV)/bin/pip install -q -e '.[test,train]'
	touch $@

# A second environment holding DeepSpeed, the numerical reference. Never a runtime dependency.
$(DS_VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(DS_VENV)
	$(DS_VENV)/bin/pip install -q $(TORCH_PIN) numpy
	$(DS_VENV)/bin/pip install -q $(DEEPSPEED_PIN) psutil pytest safetensors tensorboard matplotlib
	$(DS_VENV)/bin/pip install -q --no-deps -e .
	touch $@

test: unit parity

unit: $(VENV)/.stamp
	$(VENV)/bin/python -m pytest -q tests/unit tests/distributed

# Parity with DeepSpeed 0.19.8: same weights, same inputs, compared to fp32 round-off.
parity: $(DS_VENV)/.stamp
	$(DS_VENV)/bin/python -m pytest -q tests/reference

# On a machine with CUDA: the layer on the GPU (CPU parity, bf16, DeepSpeed where installed) and
# expert parallelism over NCCL (2+ GPUs). Skipped, not failed, without CUDA.
gpu-check: $(VENV)/.stamp
	$(VENV)/bin/python -m pytest -q -rs tests/gpu

# The main job: a byte-level MoE LM on the standard library's sources, 2 processes, ep_size=2.
demo: $(VENV)/.stamp
	$(VENV)/bin/moesaic train configs/tiny.toml --out runs/tiny-$$(date +%Y%m%d-%H%M%S)

bench: $(VENV)/.stamp
	$(VENV)/bin/python benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) $(DS_VENV) build *.egg-info src/*.egg-info

# The same benchmarks with DeepSpeed's layer side by side (builds .venv-deepspeed).
bench-ds: $(DS_VENV)/.stamp
	$(DS_VENV)/bin/python benchmarks/bench_layer.py
