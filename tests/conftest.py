"""Shared test settings.

The suite runs many small models on few cores, often beside other work: one intra-op thread per process
(inherited by the recipe subprocesses through OMP_NUM_THREADS) avoids oversubscription, which on a busy
2-core machine slows small-tensor work by an order of magnitude.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """TRL parity tests (marker ``parity``) run only when asked for: ``python -m pytest -m parity``."""
    import pytest

    if "parity" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="TRL parity suite: run with -m parity (needs the bench extra)")
    for item in items:
        if "parity" in item.keywords:
            item.add_marker(skip)
