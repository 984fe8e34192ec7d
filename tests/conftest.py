import sys
from pathlib import Path

# tests import small shared helpers (e.g. hf_models) from this folder
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Small tensors: one intra-op thread avoids OpenMP spin-waiting on a shared 2-core CI box (measured 10-40x
    slower small ops with 2 threads under load). Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
