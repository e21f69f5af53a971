"""Start-up of the engine with an empty compile cache, by phase: loading the weights, then warm-up split into
tracing, lowering and XLA compilation (JAX's own monitoring events), and the number of programs compiled.

    python bench/cold_start.py                 # the default model, 2 runs, each in a fresh process
    python bench/cold_start.py --runs 3 --max-num-seqs 64

Each run is a fresh Python process with a new, empty persistent compile cache (in a temporary folder), as on a
first start: warm-up may fill it and read it back, as serving does.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time

EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
          "/jax/core/compile/backend_compile_duration": "compile_s"}


def one_run(args) -> dict:
    """In this process: time LLMEngine's start-up, split by phase."""
    import jax

    totals, counts = collections.Counter(), collections.Counter()

    def listen(event, duration, **_):
        if event in EVENTS:
            totals[EVENTS[event]] += duration
            counts[EVENTS[event]] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    from jaxserve.engine import EngineConfig, LLMEngine
    from jaxserve.weights.loader import load_model

    start = time.perf_counter()
    model = load_model(args.model, progress=False)
    loaded = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        config = EngineConfig(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens, compile_cache_dir=cache)
        LLMEngine(model, config=config, progress=False)
    total = time.perf_counter() - start
    return {"ready_s": round(total, 1), "load_s": round(loaded, 1), "warm_up_s": round(total - loaded, 1),
            **{k: round(v, 1) for k, v in totals.items()}, "programs": counts["compile_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_run(args)))
        return
    argv = [f"--max-num-seqs={args.max_num_seqs}", f"--max-num-batched-tokens={args.max_num_batched_tokens}",
            *([f"--model={args.model}"] if args.model else []),
            *([f"--max-model-len={args.max_model_len}"] if args.max_model_len else [])]
    for i in range(args.runs):
        out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=True)
        print(f"run {i + 1}: {out.stdout.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
