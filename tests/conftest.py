import os

import pytest

# Never reach for the network in tests: hub clients fail fast instead of retrying for ~46 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread():
    """Run the test's torch work on one thread: on a busy 2-core machine two threads wait on each other (a decoder
    call took 30x longer than with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
