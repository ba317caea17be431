import os
import sys
from collections.abc import Iterator

import pytest

# Nothing in the tests may reach for the network: the Hugging Face libraries stay offline.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def _denormals_back_on() -> Iterator[None]:
    """A backend called on the test's own thread flushes denormal floats to zero there (a
    per-thread CPU setting, made for speed); later tests on that thread (hypothesis draws
    subnormal floats) need them back."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)
