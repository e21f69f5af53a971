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
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device per process
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
    outs = single.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    expected = [[single.engine.token_text(t) for t in o.outputs[0].token_ids] for o in outs]
    assert served == expected


def test_server_with_tensor_and_data_parallel_on_four_devices(folder, tmp_path):
    from serving import Server

    s = Server(str(folder), "--max-model-len", "256", "--max-num-batched-tokens", "32", "--max-num-seqs", "4",
               "--tensor-parallel-size", "2", "--data-parallel-size", "2", log_path=tmp_path / "tpdp.log",
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}).wait_ready()
    try:
        served = [httpx.post(s.url + "/v1/completions", timeout=120, json={
            "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 1}).json()
            ["choices"][0]["logprobs"]["tokens"] for p in PROMPTS]
    finally:
        assert s.stop() == 0
    single = LLM(str(folder), max_model_len=256, max_num_batched_tokens=32, max_num_seqs=4, compile_cache_dir="",
                 progress=False, warm_up=False)
    outs = single.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    assert served == [[single.engine.token_text(t) for t in o.outputs[0].token_ids] for o in outs]
