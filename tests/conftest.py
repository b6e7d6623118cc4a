import os
import sys

import pytest
import torch

# Nothing may download at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Verdicts on disk (passes/verify.py) would let one test's success stand in for another test's injected failure
# on a tiny model with the same weights; the tests that exercise them turn them on (test_verify.py).
os.environ["SPTS_VERIFY_CACHE"] = "0"
sys.path.insert(0, os.path.dirname(__file__))

# Under pytest-xdist (the README runs two workers) each worker takes one thread, so the two share the cores
# rather than oversubscribe them. SPTS_TEST_THREADS overrides it (to time one setting against another).
_THREADS = os.environ.get("SPTS_TEST_THREADS")
torch.set_num_threads(int(_THREADS) if _THREADS else 1 if os.environ.get("PYTEST_XDIST_WORKER")
                      else min(2, os.cpu_count() or 1))
torch._dynamo.config.cache_size_limit = 64


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test sees the backend's one-time warnings afresh."""
    import spts_compile
    spts_compile.reset_warnings()
    yield
