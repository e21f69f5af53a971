import os
import pathlib
import sys

import pytest

os.environ.setdefault("JAXSERVE_LOGGING_LEVEL", "WARNING")
# Four simulated CPU devices for the sharding tests; single-device code uses the first one. Set before jax loads.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)  # 2 shared cores: more threads make torch several times slower here


@pytest.fixture(scope="session")
def default_llm():
    """The embedded SmolLM2 model, compiled once for every test that needs the real thing."""
    from jaxserve import LLM

    return LLM(max_model_len=1024, max_num_batched_tokens=128, max_num_seqs=16, progress=False)
