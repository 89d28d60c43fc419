import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tests run on 2-core CI machines: keep torch to one thread so workers don't fight."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance of 2 worker slots for every test that needs one (start-up costs seconds)."""
    pytest.importorskip("ray")
    from engine.parallel import Parallel
    from engine.parallel.cluster import ray_session

    with ray_session(Parallel(workers=2)) as ray:
        yield ray
