import importlib.util
import os
import pathlib
import sys

import pytest

os.environ.setdefault("JAXSERVE_LOGGING_LEVEL", "WARNING")
# Four simulated CPU devices for the sharding tests; single-device code uses the first one. Set before jax loads.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
sys.path.insert(0, str(pathlib.Path(__file__).parent))


# Tests that compare with transformers' PyTorch models, left out where torch is not installed (the Python 3.12 /
# newest-jax leg of .ci/run installs the `test` extra only).
NEEDS_TORCH = ["test_model_parity.py", "test_gguf.py", "test_prompt_logprobs.py", "test_default_model_e2e.py",
               "test_phi3.py", "test_moe_parity.py", "test_gemma.py"]
HAVE_TORCH = importlib.util.find_spec("torch") is not None
collect_ignore = [] if HAVE_TORCH else NEEDS_TORCH


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    if HAVE_TORCH:
        import torch

        torch.set_num_threads(1)  # 2 shared cores: more threads make torch several times slower here


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernels():
    """The C++ kernels registered before any test traces the sampler (as an engine on CPU does), so every test
    runs the path CPU serving runs; tests/kernels/test_cpu_kernels.py checks them against their references."""
    import kernels_cpu
    from jaxserve.weights.default_model import cache_dir

    assert kernels_cpu.enable(cache_dir() / "kernels-cpu"), "the C++ kernels for XLA:CPU did not build"


@pytest.fixture(scope="session")
def default_llm():
    """The embedded SmolLM2 model, compiled once for every test that needs the real thing."""
    from jaxserve import LLM

    return LLM(max_model_len=1024, max_num_batched_tokens=128, max_num_seqs=16, progress=False)
