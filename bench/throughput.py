"""Throughput under load: N requests at a fixed concurrency or a Poisson request rate.

    python bench/throughput.py --concurrency 16 --prompt-len 128 --output-len 128 --num-requests 32
    python bench/throughput.py --num-requests 64 --request-rate 4          # lengths drawn with a fixed seed
    python bench/throughput.py --concurrency 16 --constrained 1            # one JSON-schema request among 16
    python bench/throughput.py --url http://127.0.0.1:8000/v1 ...          # a running server instead

Prints output and total tokens/s, TTFT and inter-token latency percentiles, and the compile count before and
after the timed run (after warm-up it must not move).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, make_requests, make_sender, print_report, run_load, summarize  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: all at once)")
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second instead")
    p.add_argument("--prompt-len", type=int, default=None, help="fixed prompt length (default: uniform 32-512)")
    p.add_argument("--output-len", type=int, default=None, help="fixed output length (default: uniform 16-256)")
    p.add_argument("--constrained", type=int, default=0, help="how many requests use a JSON-schema response")
    args = p.parse_args()
    sender = make_sender(args)
    try:
        requests = make_requests(args.num_requests, args.prompt_len or (32, 512), args.output_len or (16, 256),
                                 sender.vocab, args.seed, args.constrained)
        asyncio.run(run_load(sender.send, make_requests(2, 16, 4, sender.vocab, args.seed + 1)))  # untimed
        before = sender.compile_count()
        results, duration = asyncio.run(run_load(sender.send, requests, args.concurrency, args.request_rate,
                                                 args.seed))
        after = sender.compile_count()
        numbers = summarize(results, duration)
        numbers.update(concurrency=args.concurrency or "all", constrained=args.constrained,
                       startup_s=sender.start_s, compiles_before=before, compiles_after=after)
        print_report("throughput", numbers, args.json)
        print("no compilation during the timed run" if before == after else
              f"WARNING: {after - before} compilations during the timed run")
    finally:
        sender.close()


if __name__ == "__main__":
    main()
