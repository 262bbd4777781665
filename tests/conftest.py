import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# CPU always; CUDA when a GPU is present (skipped, not failed, without one).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no GPU"))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
