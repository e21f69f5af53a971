"""jaxserve against llama.cpp's OpenAI server on the same SmolLM2 GGUF, plus transformers' PyTorch generate.

    python bench/compare.py                      # concurrency 1, 4, 16, 64; 128-token prompts, 128 new tokens
    python bench/compare.py --levels 1 16 --threads 2

llama.cpp comes from `pip install -e ".[bench]"` (llama-cpp-python[server], compiled on install); without it that
column is skipped. Both servers are pinned to the same CPU cores (taskset) and get the same prompts (text), greedy,
with EOS banned through logit_bias so every request produces exactly --output-len tokens. Prints output tok/s,
TTFT p50/p99 and ITL p50/p99 per server and level, and the ratio jaxserve / llama.cpp.
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
            rows[level] = summarize(results, duration)
            print(f"{name:>10} c={level:<3} {rows[level]['output_tok_s']:8.1f} tok/s", flush=True)
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
        print(f"{'hf-torch':>10} c={level:<3} {rows[level]['output_tok_s']:8.1f} tok/s", flush=True)
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
    args = p.parse_args()
    from jaxserve.default_model import default_model_path
    from jaxserve.gguf_loader import load_gguf

    gguf = default_model_path()
    tokenizer = load_gguf(gguf, progress=False).tokenizer
    prompts = _prompts(tokenizer, 2 * max(args.levels), args.prompt_len, args.seed)
    cores = f"0-{args.threads - 1}"
    table = {}
    jport, lport = args.port, args.port + 1
    table["jaxserve"] = _serve_and_measure(
        "jaxserve", [sys.executable, "-m", "server.cli", "serve", "--port", str(jport), "--max-model-len", "2048",
                     "--max-num-seqs", str(max(args.levels))],
        f"http://127.0.0.1:{jport}/health", f"http://127.0.0.1:{jport}/v1", cores, {}, args.levels, prompts,
        args.output_len)
    if importlib.util.find_spec("llama_cpp") is not None:
        table["llama.cpp"] = _serve_and_measure(
            "llama.cpp", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(lport),
                          "--n_threads", str(args.threads), "--n_ctx", "8192",
                          # By default a new request interrupts the running one; queue them instead.
                          "--interrupt_requests", "False"],
            f"http://127.0.0.1:{lport}/v1/models", f"http://127.0.0.1:{lport}/v1", cores, {}, args.levels, prompts,
            args.output_len)
    else:
        print("llama-cpp-python is not installed (pip install -e '.[bench]'): skipping llama.cpp")
    if not args.skip_transformers:
        table["hf-torch"] = _transformers(gguf, args.levels, prompts, args.output_len, args.threads)
    print(f"\nSmolLM2-135M-Instruct Q4_1, {args.prompt_len}-token prompts, {args.output_len} new tokens, greedy, "
          f"{args.threads} CPU threads each")
    print(f"{'server':>10} {'conc':>5} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    for name, rows in table.items():
        for level, r in rows.items():
            cols = [r.get(k, float("nan")) for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")]
            print(f"{name:>10} {level:>5} {r['output_tok_s']:>10.1f} " + " ".join(f"{c:>8.0f}ms" for c in cols))
    if "llama.cpp" in table:
        for level in args.levels:
            ratio = table["jaxserve"][level]["output_tok_s"] / table["llama.cpp"][level]["output_tok_s"]
            print(f"jaxserve / llama.cpp at concurrency {level}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
