import os
import pathlib
import sys

import pytest

os.environ.setdefault("JAXSERVE_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)  # 2 shared cores: more threads make torch several times slower here
