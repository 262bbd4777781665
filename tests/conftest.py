import pytest
import torch

try:  # the profiles of the property tests (tests/test_properties.py)
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is in the test extras
    settings = None
if settings is not None:
    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    # CI: derandomized (the same examples every run), a bounded number of them, no deadline
    # (a shared 2-core machine times noisily).
    settings.register_profile("ci", derandomize=True, max_examples=150, deadline=None,
                              suppress_health_check=_quiet, print_blob=True)
    # pytest --hypothesis-profile=long: many more examples, a new random seed each run.
    settings.register_profile("long", max_examples=2000, deadline=None,
                              suppress_health_check=_quiet, print_blob=True)
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
