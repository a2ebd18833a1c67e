"""Settings for the whole suite."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_threaded_torch():
    """Run torch single-threaded: tiny models gain nothing from intra-op threads, and on a busy
    2-core machine OpenMP workers contending for the cores made tests 10-30x slower. Processes
    the tests start get OMP_NUM_THREADS from cli.federation for the same reason."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
