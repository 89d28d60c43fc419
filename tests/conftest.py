import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tests run on 2-core CI machines: keep torch to one thread so workers don't fight."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
