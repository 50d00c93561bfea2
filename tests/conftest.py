"""Shared pytest set-up: the repository root on sys.path, a small fixed thread count, a fixed seed."""
import os
import random
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests use tiny tensors: one intra-op thread is fastest, and on a busy 2-core machine OpenMP's
# spinning threads make a tiny DiT forward ~100x slower (93 ms vs 0.9 ms). TEST_TORCH_THREADS overrides.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))


@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (minutes each file)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process fault injection through torchrun; run with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
