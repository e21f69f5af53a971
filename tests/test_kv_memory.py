"""KV cache sizing: explicit pages or GiB per device, device memory after a profiled step, refusal when one
sequence does not fit (jaxserve/core/kv_memory.py)."""

import pytest

import tiny
from jaxserve.core import kv_memory
from jaxserve.core.kv_memory import DeviceMemory, KVCacheTooSmall
from jaxserve.engine import EngineConfig, LLMEngine

MIB = 2**20
# The tiny model: K and V of 2 layers x 2 kv heads x head_dim 16 in float32, pages of 8 tokens: 2*2*2*8*16*4 bytes.
PAGE_BYTES = 4096


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_checkpoint(tmp_path_factory.mktemp("kv_memory"), "llama")


def _engine(folder, **config):
    base = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, page_size=8, compile_cache_dir="",
                warm_up=False)
    return LLMEngine(str(folder), config=EngineConfig(**(base | config)), progress=False)


def test_utilization_leaves_the_weights_and_the_profiled_step_room():
    # Two devices: the one with less room decides. Device 0: 0.5 x 1000 MiB - (300 - 2 MiB of profiled cache)
    # - 50 MiB of step = 152 MiB; device 1: 0.5 x 800 - 298 - 10 = 92 MiB.
    before = [DeviceMemory(1000 * MIB, 300 * MIB, 300 * MIB), DeviceMemory(800 * MIB, 300 * MIB, 300 * MIB)]
    after = [DeviceMemory(1000 * MIB, 300 * MIB, 350 * MIB), DeviceMemory(800 * MIB, 300 * MIB, 310 * MIB)]
    assert kv_memory.pages_for_utilization(before, after, 0.5, MIB, 2 * MIB) == 92
    # A device already past its share leaves no room (never a negative count).
    assert kv_memory.pages_for_utilization(before, after, 0.1, MIB, 2 * MIB) == 0


def test_a_cache_too_small_for_one_sequence_is_refused_with_what_fits(folder):
    # 10 pages of 8 tokens hold 80 tokens; max_model_len 128 needs 16 pages.
    with pytest.raises(KVCacheTooSmall) as error:
        _engine(folder, kv_cache_memory_gb=10 * PAGE_BYTES / 2**30)
    message = str(error.value)
    assert "holds 80 tokens, fewer than one sequence of max_model_len 128 (16 pages" in message
    assert "Lower --max-model-len to at most 80" in message
    with pytest.raises(KVCacheTooSmall, match="num_kv_pages: 15 pages of 8 tokens"):
        _engine(folder, num_kv_pages=15)


def test_explicit_sizes_per_device(folder):
    engine = _engine(folder, kv_cache_memory_gb=40 * PAGE_BYTES / 2**30)
    assert engine.core.block_manager.num_pages == 40
    assert engine.core.runner.cache.kv[0].shape[0] == 40
    # No more pages than max_num_seqs full-length sequences can use: 4 x 16.
    assert _engine(folder, num_kv_pages=1000).core.block_manager.num_pages == 64
    # CPU devices report no memory: the default size per device (2 GiB here holds far more than 64 pages).
    assert _engine(folder).core.block_manager.num_pages == 64


def test_device_memory_sizes_the_cache_after_a_profiled_step(folder, monkeypatch):
    """As on a TPU or GPU: the devices report their memory; the cache gets what the weights and the profiled
    largest step leave of gpu_memory_utilization, per device."""
    profiled = []
    stats = {"before": DeviceMemory(8 * MIB, 1 * MIB, 1 * MIB), "after": DeviceMemory(8 * MIB, 1 * MIB, 3 * MIB)}

    def fake_of(device):
        return stats["after"] if profiled else stats["before"]

    from jaxserve.core.model_runner import ModelRunner

    real_step = ModelRunner.profile_step

    def profile_step(self):
        real_step(self)
        profiled.append(self.cache.kv[0].shape[0])

    monkeypatch.setattr(DeviceMemory, "of", staticmethod(fake_of))
    monkeypatch.setattr(ModelRunner, "profile_step", profile_step)
    engine = _engine(folder, max_num_seqs=64, gpu_memory_utilization=0.5)
    assert profiled == [16]  # one profiled step, with a cache of one full-length sequence
    # 0.5 x 8 MiB - (1 MiB - 16 profiled pages) - 2 MiB of step = 1 MiB + 16 pages.
    expected = (MIB + 16 * PAGE_BYTES) // PAGE_BYTES
    assert engine.core.block_manager.num_pages == expected
    # Too little memory for one sequence: refused, saying where the number came from.
    profiled.clear()
    stats["after"] = DeviceMemory(8 * MIB, 1 * MIB, 4 * MIB + 6 * PAGE_BYTES)  # leaves 10 pages
    with pytest.raises(KVCacheTooSmall, match=r"gpu_memory_utilization 0\.5 of 0\.01 GiB: 10 pages"):
        _engine(folder, gpu_memory_utilization=0.5)


@pytest.mark.parametrize("value", [0, 1.5, -0.1])
def test_utilization_outside_0_1_is_refused(folder, value):
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        _engine(folder, gpu_memory_utilization=value)
