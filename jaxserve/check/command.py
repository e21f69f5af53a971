"""`jaxserve check CONFIG.json --target tpu-v6e-4 ...`: does this model, at this configuration, compile and fit?

Compiles every serving program (jaxserve/check/programs.py) for a TPU target on this machine, with libtpu and
no TPU, and prints per program its compile time, the compiler's per-chip memory against the chip's HBM and a
roofline estimate of its run time from the compiled cost analysis. A CUDA target is lowered only (compiling
needs the GPU): its rows give the lowering time, the memory of the placed arguments and outputs (no
temporaries: "-") and a cost from the program before partitioning. The last line begins `check: OK` and the
exit status is 0 only when every program compiled (or lowered) and fits.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

from jaxserve.check import libtpu, targets

GIB = 2**30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxserve check", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a transformers config.json (or a folder holding one); no weights are read")
    p.add_argument("--target", required=True, help=f"one of {', '.join(targets.names())}")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="mixtures of experts: whole experts per chip over the tensor-parallel chips (as serve's flag)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV-cache page (default 128 on TPU, 16 elsewhere)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-gb", type=float, help="KV cache per chip, in GiB (default: from memory)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--buckets", default="smallest,largest",
                   help="which token buckets to compile: smallest,largest (default) or all")
    p.add_argument("--compile-workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="buckets compiled at once, on threads (default: the cores this process may use)")
    p.add_argument("--quantization", choices=["none", "int8", "int4", "fp8"], default="none",
                   help="quantize the decoder layers' weights as `jaxserve serve --quantization` does at load")
    p.add_argument("--quantization-group-size", type=int, default=128, help="inputs per scale of int4 weights")
    p.add_argument("--quantize-lm-head", action="store_true", help="quantize the LM head and embeddings too")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8", "fp8"], default="auto",
                   help="KV cache codes with a scale per token and head (the GPU kernel and XLA read them)")
    return p


def _hf_config(path: str) -> dict:
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    return json.loads(p.read_text())


def _gib(n: float) -> str:
    return f"{n / GIB:.3f}"


def report(serving, compiled: list, buckets: list[int], seconds: float) -> tuple[list[str], bool]:
    """The table's lines and whether everything fits: for each program, what stays resident on a chip plus what
    running it adds, against the chip's HBM."""
    from jaxserve.check.programs import per_chip_bytes

    chip = serving.target.chip
    resident = per_chip_bytes((serving.params, *serving.state(serving.kv_pages)))
    seconds_column = "lower s" if serving.target.lowers_only else "compile s"
    lines = [f"{'program':<16} {'bucket':<14} {seconds_column:>9} {'args GiB':>9} {'temp GiB':>9} {'peak GiB':>9} "
             f"{'GFLOP':>9} {'GB moved':>9} {'coll MB':>8} {'est ms':>8}"]
    fits = True
    for c in compiled:
        if c.error:
            fits = False
            lines.append(f"{c.name:<16} {c.bucket:<14} {c.seconds:>9.1f}  FAILED: {c.error}")
            continue
        peak = c.peak_bytes(resident)
        over = peak > chip.hbm_bytes
        fits &= not over
        est = c.seconds_at_roofline(chip.bf16_flops, chip.hbm_bandwidth) * 1e3
        temp, moved, coll, est = (f"{_gib(c.temp_bytes):>9}", f"{c.bytes_accessed / 1e9:>9.3f}",
                                  f"{c.collective_bytes / 1e6:>8.3f}", f"{est:>8.3f}") if c.compiled else \
            (f"{'-':>9}", f"{'-':>9}", f"{'-':>8}", f"{'-':>8}")
        lines.append(f"{c.name:<16} {c.bucket:<14} {c.seconds:>9.1f} {_gib(c.argument_bytes):>9} {temp} "
                     f"{_gib(peak):>9} {c.flops / 1e9:>9.2f} {moved} {coll} {est}" + ("  OVER HBM" if over else ""))
    summed = sum(c.seconds for c in compiled)
    verb = _verb(serving.target)
    lines.append(f"{verb} {len(compiled)} programs in {seconds:.1f} s of wall time ({summed:.1f} s summed over "
                 f"programs; those {verb} side by side share the cores)")
    if serving.target.lowers_only:
        lines.append("(lowered only: temporaries, memory traffic and collectives are known after compiling, so no "
                     "roofline time; FLOPs are the unpartitioned program's divided by the GPUs)")
        return lines, fits
    for b in buckets:
        step = [c for c in compiled if c.bucket.startswith(f"T={b} ") and c.name in ("forward", "sample")]
        ms = sum(c.seconds_at_roofline(chip.bf16_flops, chip.hbm_bandwidth) for c in step) * 1e3
        seqs = min(b, serving.config.max_num_seqs)
        lines.append(f"step T={b} S={seqs} (forward + sample) at the roofline: {ms:.3f} ms"
                     + (f", {seqs / ms * 1e3:,.0f} sampled tokens/s when each of the {seqs} rows samples" if ms else ""))
    return lines, fits


def _verb(target) -> str:
    return "lowered" if target.lowers_only else "compiled"


def run(args: argparse.Namespace) -> int:
    from jaxserve.check.programs import CompileFailed, Serving, per_chip_bytes
    from jaxserve.core import kv_memory
    from jaxserve.core.engine_core import EngineConfig
    from jaxserve.models.base import count_params
    from jaxserve.models.config import ModelConfig
    from jaxserve.quantization.schemes import WeightQuantization, check_backend

    target = targets.target(args.target)
    cfg = ModelConfig.from_hf(_hf_config(args.config))
    config = EngineConfig(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.block_size,
                          tensor_parallel_size=args.tensor_parallel_size,
                          enable_expert_parallel=args.enable_expert_parallel,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory_gb=args.kv_cache_memory_gb, kv_cache_dtype=args.kv_cache_dtype)
    chip = target.chip
    try:
        quantize = None
        if args.quantization != "none":
            quantize = WeightQuantization(args.quantization, args.quantization_group_size,
                                          lm_head=args.quantize_lm_head)
            check_backend(args.quantization, chip.platform, chip.name)
        serving = Serving.build(cfg, config, target, args.dtype, quantize)
    except ValueError as e:  # more chips asked for than the target has, a scheme the chip cannot run
        print(f"check: {e}", file=sys.stderr)
        return 2
    weights = per_chip_bytes(serving.params)
    print(f"jaxserve check: {cfg.model_type}, {count_params(serving.params) / 1e9:.2f}B parameters, {args.dtype}"
          f"{'' if quantize is None else ' with ' + args.quantization + ' weights'}, "
          f"on {args.target} ({target.chips} x {chip.name}: {_gib(chip.hbm_bytes)} GiB HBM, "
          f"{chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s per chip), "
          f"tp {config.tensor_parallel_size}{' (expert parallel)' if config.enable_expert_parallel else ''}, "
          f"max_model_len {serving.max_model_len}, "
          f"max_num_seqs {config.max_num_seqs}, {_gib(weights)} GiB of weights per chip", flush=True)
    start = time.perf_counter()
    try:
        profiled = serving.size_kv_cache()
    except (kv_memory.KVCacheTooSmall, CompileFailed) as e:
        print(f"check: FAILED: {e}")
        return 1
    print(kv_memory.describe(serving.kv_pages, serving.config.page_size, serving.page_bytes, serving.kv_source,
                             serving.kv_layout.ring_pages, serving.kv_layout.ring_bytes), flush=True)
    all_buckets = serving.buckets
    buckets = all_buckets if args.buckets == "all" else sorted({all_buckets[0], all_buckets[-1]})
    compiled = serving.compile_all(buckets, args.compile_workers)
    seconds = time.perf_counter() - start
    lines, fits = report(serving, compiled, buckets, seconds)
    print("\n".join(lines))
    if profiled:
        print(f"(sizing the KV cache {_verb(target)} the largest bucket once more with one sequence's cache: "
              f"{sum(c.seconds for c in profiled):.1f} s, counted above)")
    if not fits:
        print(f"check: FAILED: some program did not {'lower' if target.lowers_only else 'compile'} or needs more "
              f"than the {_gib(chip.hbm_bytes)} GiB of one {chip.name}")
        return 1
    print(f"check: OK: {len(compiled)} programs {_verb(target)} for {args.target} ({len(buckets)} of "
          f"{len(all_buckets)} buckets) and fit in {_gib(chip.hbm_bytes)} GiB per chip"
          + (" (without temporaries: compiling needs the GPU)" if target.lowers_only else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target = targets.target(args.target)
    except ValueError as e:
        print(f"check: {e}", file=sys.stderr)
        return 2
    if not target.lowers_only and not libtpu.importable():  # again with libtpu on the path (never imported here)
        env = libtpu.environment()
        os.execve(sys.executable, [sys.executable, "-m", "jaxserve.check", *(sys.argv[1:] if argv is None else argv)],
                  env)
    return run(args)
