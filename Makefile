# Two commands are the contract with every new user: `make demo` and `make test`.
# Each builds its own virtual environment on first use. CPU torch is pinned here (the set-up
# path of this project's machines); pyproject.toml stays open (torch>=2.4) for CUDA users.
PYTHON ?= python3
VENV := .venv
DS_VENV := .venv-deepspeed
TORCH_PIN := torch==2.13.0
DEEPSPEED_PIN := deepspeed==0.19.8
# Hugging Face transformers (optional extra "hf"): moesaic.hf, its tests, and the reference routing code of
# tests/unit/test_hf_reference.py.
# Installed with TORCH_PIN in the same command, so pip keeps torch at the pinned build.
TRANSFORMERS_PIN := transformers==5.24.0

.PHONY: test unit integration parity gpu-check demo bench bench-ds clean config-reference invariance

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_PIN)
	$(VENV)/bin/pip install -q -e '.[test,train,hf]' $(TRANSFORMERS_PIN) $(TORCH_PIN)
	touch $@

# A second environment holding DeepSpeed, the numerical reference. Never a runtime dependency.
$(DS_VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(DS_VENV)
	$(DS_VENV)/bin/pip install -q $(TORCH_PIN) numpy
	$(DS_VENV)/bin/pip install -q $(DEEPSPEED_PIN) psutil pytest safetensors tensorboard matplotlib
	$(DS_VENV)/bin/pip install -q --no-deps -e .
	touch $@

# The two environments are built side by side first (on a fresh machine that is most of the wait: pip
# downloads and installs; measured in README "Development"), then the three test stages run one after another.
test:
	$(MAKE) -j2 $(VENV)/.stamp $(DS_VENV)/.stamp
	$(MAKE) unit integration parity

# Fast single-process tests: no subprocesses, no process groups.
unit: $(VENV)/.stamp
	$(VENV)/bin/python -m pytest -q tests/unit

# Processes: the CLI and its launcher, kills and resumes, the README's commands, 2-4 rank gloo groups.
# Two test files at a time (pytest-xdist, one file per worker): these tests wait on process start-up and
# on each other's ranks, so two streams fill a 2-core machine better (459 s -> 326 s measured on one). The
# unit tests stay serial: torch's own threads already use every core there.
integration: $(VENV)/.stamp
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests/integration tests/distributed

# Parity with DeepSpeed 0.19.8: same weights, same inputs, compared to fp32 round-off.
parity: $(DS_VENV)/.stamp
	$(DS_VENV)/bin/python -m pytest -q tests/reference

# The whole layout-invariance matrix (docs/invariance.md): 192 layouts at W=1, 2, 4 against W=1 ZeRO 0.
# Not part of `make test`, which runs its CI subset of 6 layouts (tests/distributed/test_invariance.py).
invariance: $(VENV)/.stamp
	MOESAIC_INVARIANCE=full $(VENV)/bin/python -m pytest -q -s tests/distributed/test_invariance.py

# The main job: a byte-level MoE LM on the standard library's sources, 2 processes, ep_size=2.
demo: $(VENV)/.stamp
	$(VENV)/bin/moesaic train configs/tiny.toml --out runs/tiny-$$(date +%Y%m%d-%H%M%S)

bench: $(VENV)/.stamp
	$(VENV)/bin/python benchmarks/bench_layer.py

# docs/config-reference.md from the config dataclasses (tests/unit/test_config_reference.py fails when stale)
config-reference: $(VENV)/.stamp
	$(VENV)/bin/python -m moesaic.config_reference --out docs/config-reference.md

clean:
	rm -rf $(VENV) $(DS_VENV) $(GPU_VENV) build *.egg-info src/*.egg-info

# The same benchmarks with DeepSpeed's layer side by side (builds .venv-deepspeed).
bench-ds: $(DS_VENV)/.stamp
	$(DS_VENV)/bin/python benchmarks/bench_layer.py

# On a machine with a GPU: every CUDA/NCCL check in one command (tests/gpu; skipped without CUDA).
# Builds .venv-gpu with a CUDA build of torch (GPU_TORCH; pin it to the machine's CUDA if needed).
GPU_VENV := .venv-gpu
GPU_TORCH ?= torch>=2.4
$(GPU_VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q '$(GPU_TORCH)'
	$(GPU_VENV)/bin/pip install -q -e '.[test,train]'
	touch $@

gpu-check: $(GPU_VENV)/.stamp
	$(GPU_VENV)/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device visible to torch ' + torch.__version__)"
	$(GPU_VENV)/bin/python -m pytest -q -rs tests/gpu
