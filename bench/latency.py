"""Latency of a batch of identical requests, repeated: per-request latency, TTFT, inter-token latency and
decode tokens/s per stream and in aggregate.

    python bench/latency.py                        # one stream, 128-token prompt, 128 new tokens
    python bench/latency.py --batch-size 8 --iters 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, make_requests, make_sender, print_report, run_load  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    sender = make_sender(args)
    try:
        asyncio.run(run_load(sender.send, make_requests(1, 16, 4, sender.vocab, args.seed + 1)))  # untimed
        before = sender.compile_count()
        results, durations = [], []
        for i in range(args.iters):
            batch = make_requests(args.batch_size, args.prompt_len, args.output_len, sender.vocab, args.seed + i)
            res, dt = asyncio.run(run_load(sender.send, batch))
            results += res
            durations.append(dt)
        lat = np.array([r.latency for r in results])
        ttft = np.array([r.ttft for r in results])
        itl = np.array([x for r in results for x in r.itls])
        decode = [(r.output_tokens - 1) / (r.latency - r.ttft) for r in results if r.output_tokens > 1]
        numbers = {
            "batch_size": args.batch_size, "prompt_len": args.prompt_len, "output_len": args.output_len,
            "iters": args.iters, "latency_mean_s": float(lat.mean()), "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p99_s": float(np.percentile(lat, 99)), "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
            "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)), "itl_p99_ms": 1e3 * float(np.percentile(itl, 99)),
            "decode_tok_s_per_stream": float(np.mean(decode)),
            "aggregate_tok_s": sum(r.output_tokens for r in results) / sum(durations),
            "startup_s": sender.start_s, "compiles_before": before, "compiles_after": sender.compile_count(),
        }
        print_report("latency", numbers, args.json)
    finally:
        sender.close()


if __name__ == "__main__":
    main()
