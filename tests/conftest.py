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


def pytest_ignore_collect(collection_path, config):
    """The TRL parity suite (marker ``parity``; it imports TRL, which takes seconds) is collected only when asked
    for: ``python -m pytest -m parity tests/test_trl_parity.py tests/test_trl_parity_kto_orpo.py``."""
    if collection_path.name.startswith("test_trl_parity") and "parity" not in (config.getoption("-m") or ""):
        return True
    return None
