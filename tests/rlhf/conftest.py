import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small to gain from threads, and beside another busy process on two
    cores OpenMP threads spin against it (the reward tests took 106 s with two threads, 9.5 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
