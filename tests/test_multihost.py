"""Two processes on 127.0.0.1 serve one model sharded across both (JAX distributed, gloo on CPU): process 0
answers HTTP, both step the same batches, and the tokens equal a single process's."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

import tiny
from jaxserve import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 8, 99, 3], list(range(10, 40))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 4 kv heads: split across the two processes' devices for real.
    return tiny.make_checkpoint(tmp_path_factory.mktemp("mh"), "llama", num_attention_heads=4, num_key_value_heads=4)


def test_two_processes_serve_the_same_tokens_as_one(folder, tmp_path):
    coordinator, http_port = _free_port(), _free_port()
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",  # one CPU device per process
           "JAXSERVE_DISTRIBUTED_SECRET": "test-secret"}
    common = [sys.executable, "-m", "server.cli", "serve", str(folder), "--max-model-len", "256",
              "--max-num-batched-tokens", "32", "--max-num-seqs", "4", "--tensor-parallel-size", "2",
              "--distributed-coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2", "--port", str(http_port)]
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen(common + ["--process-id", str(i)], env=env, stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        deadline = time.time() + 300
        while True:
            assert all(p.poll() is None for p in procs), (tmp_path / "p0.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the two-process server did not become ready"
            time.sleep(1)
        served = []
        for prompt in PROMPTS:
            r = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", timeout=120, json={
                "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 1})
            assert r.status_code == 200, r.text
            served.append(r.json()["choices"][0]["logprobs"]["tokens"])
    finally:
        procs[0].terminate()
        codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0], [(tmp_path / f"p{i}.log").read_text()[-2000:] for i in range(2)]
    single = LLM(str(folder), max_model_len=256, max_num_batched_tokens=32, max_num_seqs=4, compile_cache_dir="",
                 progress=False, warm_up=False)
    outs = single.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0),
                           use_tqdm=False)
    expected = [[next(iter(e.values())).decoded_token for e in o.outputs[0].logprobs] for o in outs]
    assert served == expected


def test_server_with_tensor_parallel_on_four_devices(folder, tmp_path):
    from serving import Server

    s = Server(str(folder), "--max-model-len", "256", "--max-num-batched-tokens", "32", "--max-num-seqs", "4",
               "--tensor-parallel-size", "4", log_path=tmp_path / "tp4.log",
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}).wait_ready()
    try:
        served = [httpx.post(s.url + "/v1/completions", timeout=120, json={
            "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 1}).json()
            ["choices"][0]["logprobs"]["tokens"] for p in PROMPTS]
    finally:
        assert s.stop() == 0
    single = LLM(str(folder), max_model_len=256, max_num_batched_tokens=32, max_num_seqs=4, compile_cache_dir="",
                 progress=False, warm_up=False)
    outs = single.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0),
                           use_tqdm=False)
    assert served == [[next(iter(e.values())).decoded_token for e in o.outputs[0].logprobs] for o in outs]


def test_several_processes_need_a_secret(monkeypatch):
    from jaxserve.parallel.distributed import Cluster

    monkeypatch.delenv("JAXSERVE_DISTRIBUTED_SECRET", raising=False)
    with pytest.raises(ValueError, match="--distributed-secret"):
        Cluster.from_args("127.0.0.1:1234", 2, 0)
    assert Cluster.from_args("127.0.0.1:1234", 2, 1, "s").secret == "s"
    monkeypatch.setenv("JAXSERVE_DISTRIBUTED_SECRET", "from-env")
    assert Cluster.from_args("127.0.0.1:1234", 2, 0).secret == "from-env"
    assert "from-env" not in repr(Cluster.from_args("127.0.0.1:1234", 2, 0))
    assert Cluster.from_args(None, 1, 0) is None  # one process needs none


def _arrays(x) -> list:
    """The arrays inside one message argument (an array, an int, a tuple of arrays or a step dataclass)."""
    import dataclasses

    import numpy as np

    if dataclasses.is_dataclass(x):
        return [np.asarray(getattr(x, f.name)) for f in dataclasses.fields(x)]
    return [np.asarray(v) for v in x] if isinstance(x, tuple) else [np.asarray(x)]


def test_the_step_channel_carries_no_pickles():
    """Step inputs cross as a JSON header plus raw array bytes; a pickle, an unknown type or an object array is
    refused before anything is built from it."""
    import json
    import pickle

    import numpy as np

    from jaxserve.parallel.distributed import decode, encode
    from jaxserve.core.input_batch import NUM_ROW_COLS, StepInput

    rng = np.random.default_rng(0)
    step = StepInput(*(rng.integers(-1, 100, shape).astype(np.int32) for shape in [(8,), (8,), (8,), (2, NUM_ROW_COLS)]),
                     rng.random((2, 6), np.float32), rng.integers(-1, 9, (5, 3)).astype(np.int32))
    rows = (np.arange(5, dtype=np.int32), np.ones(5, np.bool_), np.linspace(0, 1, 5, dtype=np.float32))
    masks = (np.array([1, 2], np.int32), rng.integers(0, 2**31, (2, 3)).astype(np.int32))
    for message in [("forward", step), ("init_slot", 3, rows), ("prompt_logprobs", np.arange(4, dtype=np.int32)),
                    ("sample",), ("sample", *masks), ("write_tables", step.table_writes), ("reset",), ("stop",)]:
        frames = encode(message)
        assert all(isinstance(f, bytes) for f in frames)
        got = decode(frames)
        assert got[0] == message[0] and len(got) == len(message)
        for want, have in zip(message[1:], got[1:]):
            assert type(want) is type(have)
            for a, b in zip(_arrays(want), _arrays(have)):
                assert a.dtype == b.dtype and np.array_equal(a, b)

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    with pytest.raises(ValueError):  # a pickle is not JSON
        decode([pickle.dumps(("forward", Evil()))])
    forged = json.dumps({"kind": "forward", "args": [{"dataclass": "Evil", "fields": {}}], "frames": 0}).encode()
    with pytest.raises(KeyError):
        decode([forged])
    forged = json.dumps({"kind": "x", "args": [{"array": 0, "dtype": "|O", "shape": [1]}], "frames": 1}).encode()
    with pytest.raises(ValueError, match="object arrays"):
        decode([forged, b"\0" * 8])


def test_recovery_resets_the_followers_too(folder):
    """After a failed step the leader rebuilds its device state and tells every follower to do the same, over the
    channel (a follower left with its old state would hang the next collective)."""
    from multiprocessing import Pipe

    from jaxserve.parallel.distributed import FollowerChannel, LeaderChannel
    from jaxserve.engine import EngineConfig, LLMEngine

    engine = LLMEngine(str(folder), config=EngineConfig(max_model_len=128, max_num_seqs=2, max_num_batched_tokens=16,
                                                        page_size=8, num_kv_pages=32, compile_cache_dir="",
                                                        warm_up=False), progress=False)
    leader_end, follower_end = Pipe()
    engine.runner.peers = LeaderChannel([leader_end])
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
    engine.step()
    engine.recover()
    engine.runner.peers.send(("stop",))
    follower = FollowerChannel(follower_end)
    kinds = []
    while not kinds or kinds[-1] != "stop":
        kinds.append(follower.recv()[0])
    assert kinds[-2:] == ["reset", "stop"] and "forward" in kinds
