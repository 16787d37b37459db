"""Entry point of the DeepSpeed-suite shim: Python imports this module at start-up when this
folder is on PYTHONPATH. It does nothing unless ``MOESAIC_DS_SUITE`` is set (see README.md).

Start-up is the one place that reaches every process of a DeepSpeed unit test: the harness
starts its ranks with the ``forkserver`` method, so a pytest plugin alone would only patch the
parent process.
"""

import os

if os.environ.get("MOESAIC_DS_SUITE"):
    import ds_suite_binding

    ds_suite_binding.install(os.environ["MOESAIC_DS_SUITE"])
