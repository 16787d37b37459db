"""Shared by every test folder: its presence puts tests/ on sys.path, so ``support`` (helpers that
spawned processes must import by module name) is importable from unit and integration tests alike."""

import os


def pytest_configure(config):
    """Under pytest-xdist (``make integration``: two workers on a 2-core machine) each worker, and every process it
    starts, gets its share of the cores: ``OMP_NUM_THREADS`` = cores // workers (unless already set).

    torch's default is one thread per core in every process; with the cores already busy, each parallel operation
    then waits at its barrier for a thread that is not running (measured on the 2-core machine while another test
    run kept it busy: pytest running tests/unit/test_models.py::test_generate_length_determinism_and_mode used
    14.9-32.4 s CPU at 2 threads, 6.0-6.3 s at 1; on the machine nearly idle, ``-n 2`` over test_train_sft_cli,
    test_train_cli and test_checkpoint_kills took 40.7 and 40.3 s at 2 threads, 37.4 and 38.5 s at 1, alternated).
    Serial runs (``make unit``) keep torch's default. Tests that compare numbers compare runs of the same setting.
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
