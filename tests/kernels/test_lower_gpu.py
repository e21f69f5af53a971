"""Every Pallas GPU kernel lowers for CUDA through jax.export and serializes (no GPU needed)."""
import pytest

from kernels_pallas import check_gpu

CASES = dict(check_gpu.cases())


@pytest.mark.parametrize("name", CASES)
def test_lowers_for_cuda(name):
    CASES[name]()
