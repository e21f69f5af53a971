"""Our TPU attention kernel next to JAX's own (jax.experimental.pallas.ops.tpu.ragged_paged_attention), compiled
for v5e and v6e with libtpu on this CPU machine at serving shapes: whether each compiles, and what the compiled
kernel holds and does, read from Mosaic's final (LLO) dump of it.

Both take the same cache layout ([pages, page_size, 2 * kv heads, head_dim]). JAX's kernel scalar-prefetches the
whole [max_num_seqs, pages_per_seq] block table into SMEM and writes no KV (the engine would need a second
kernel or scatter for that); ours reads one sequence's table row at a time and writes the step's K/V itself.
Per (chip, shape, kernel) it prints the compile time, the SMEM and VMEM the kernel's operands and scratch take
(each pipelined block counted once; Mosaic double-buffers those), and the vector instructions of the compiled
kernel: its kv loop body is most of them, one kv block of `kv` positions x all kv heads x `rows` query rows per
trip, given so that the two can be compared per unit of work. Both kernels get the same block sizes (ours for
the chip) and the same rows per grid step.
JAX's kernel reads the chip from the abstract mesh in context, which jax 0.10 does not support (it asks the
attached device, and there is none): run this on jax 0.11+ (Python 3.12 here) to see both.
Run: python bench/tpu_kernels.py (installs the pinned libtpu into the jaxserve cache folder on first use).
It measures no run time (no TPU here); it is not a test.
"""
import collections
import math
import os
import pathlib
import re
import sys
import tempfile
import time

SHAPES = [  # (label, Hq, Hkv, D, page_size, max_model_len, max_num_seqs, tokens)
    ("Llama-3.1-8B tp1, 32k x 256 seqs, decode", 32, 8, 128, 128, 32768, 256, 256),
    ("Llama-3.1-8B tp1, 32k x 256 seqs, prefill 2048", 32, 8, 128, 128, 32768, 256, 2048),
    ("Llama-3.1-8B tp8, 128k x 64 seqs, page 16, decode", 4, 1, 128, 16, 131072, 64, 64),
    ("Qwen2.5-14B tp4, 32k x 256 seqs, page 16, decode", 10, 2, 128, 16, 32768, 256, 256),
]
DUMP = pathlib.Path(os.environ.get("JAXSERVE_MOSAIC_DUMP", tempfile.gettempdir())) / "jaxserve-mosaic-dump"
_MEMREF = re.compile(r"memref<([\dx]+)x(bf16|f32|i32|u32|i8), (?:#tpu\.tiled<[^>]*>, )?#tpu\.memory_space<(vmem|smem)")
_BYTES = {"bf16": 2, "f32": 4, "i32": 4, "u32": 4, "i8": 1}


def compiled_kernel(fn, args, donate, device) -> tuple[float, str]:
    """Compiles for `device` (a topology's TPU) and returns the seconds it took and the kernel's final LLO."""
    import jax
    for old in DUMP.glob("*"):  # Mosaic dumps every pass: tens of MB per kernel
        old.unlink()
    t0 = time.perf_counter()
    with jax.sharding.use_abstract_mesh(jax.sharding.Mesh([device], ("x",)).abstract_mesh):
        jax.jit(fn, donate_argnums=donate).trace(*args).lower().compile()
    seconds = time.perf_counter() - t0
    final = sorted(DUMP.glob("*finalize-llo*"), key=lambda p: p.stat().st_mtime)
    return seconds, final[-1].read_text() if final else ""


def kernel_figures(llo: str) -> str:
    """SMEM / VMEM of the kernel function's operands and scratch, and its vector instruction count."""
    signature = llo[llo.index("func.func"):llo.index(") attributes")] if "func.func" in llo else ""
    space = collections.Counter()
    for operand in re.findall(r"%\w+: i32 \{([^{}]*)\}", signature):
        if "unspecified_memory_space" in operand:  # pl.ANY operands (the cache, tables): they stay in HBM
            continue
        for dims, dtype, where in _MEMREF.findall(operand):
            space[where] += math.prod(int(x) for x in dims.split("x")) * _BYTES[dtype]
    vector_ops = len(re.findall(r"llo\.v[a-z_]+", llo))
    return f"SMEM {space['smem'] / 1024:8.1f} KiB  VMEM {space['vmem'] / 2**20:6.2f} MiB  {vector_ops:6d} vector ops"


def main():
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as jax_rpa

    from kernels_pallas import tiles, tpu

    for topo in ("v5e:2x2", "v6e:2x2"):
        device = topologies.get_topology_desc(topo, platform="tpu").devices[0]
        chip = tpu.generation(device.device_kind)
        sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=jax.sharding.SingleDeviceSharding(device))
        for label, hq, hkv, d, ps, max_len, seqs, t in SHAPES:
            pages_per_seq = max_len // ps
            num_pages = min(seqs * pages_per_seq, (8 << 30) // (ps * 2 * hkv * d * 2))   # an 8 GiB bf16 cache
            q, kv = sd((t, hq, d), jnp.bfloat16), sd((num_pages, ps, 2 * hkv, d), jnp.bfloat16)
            new = sd((t, hkv, d), jnp.bfloat16)
            i32 = lambda *shape: sd(shape, jnp.int32)
            table = i32(seqs, pages_per_seq)
            blocks = tpu.BLOCKS[chip]
            q_tile = tiles.default_q_tile(t, seqs, prefill=blocks.prefill_q_tile)
            g = hq // hkv
            rows = -(-q_tile * g // tpu.ROW_ALIGN) * tpu.ROW_ALIGN
            kv_positions = max(1, min(blocks.block_kv // ps, pages_per_seq)) * ps
            # JAX's kernel looks its block sizes up for the TPU it runs on (none here): give it ours, and as many
            # query rows per step (its blocks count tokens; each brings g rows).
            theirs = dict(num_kv_pages_per_block=kv_positions // ps, num_queries_per_block=max(1, rows // g))
            kernels = {
                "jaxserve": (lambda *a: tpu.ragged_paged_attention(*a, sm_scale=d ** -0.5, generation=chip),
                             (q, new, new, kv, i32(t), i32(seqs), table, i32(seqs + 1), i32(1)), 3),
                "jax.experimental": (lambda *a: jax_rpa.ragged_paged_attention(*a, sm_scale=d ** -0.5, **theirs),
                                     (q, kv, i32(seqs), table, i32(seqs + 1), i32(1)), ()),
            }
            for name, (fn, args, donate) in kernels.items():
                try:
                    seconds, llo = compiled_kernel(fn, args, donate, device)
                    result = f"compiled in {seconds:4.1f} s  {kernel_figures(llo)}"
                except Exception as e:  # a refusal is the result
                    lines = [ln for ln in str(e).splitlines() if ln.strip()]
                    result = "FAILED: " + (lines[0] if lines else type(e).__name__)[:160]
                print(f"{topo:8s} {label:50s} kv {kv_positions:3d} x {hkv} heads x {rows:3d} rows  {name:17s} "
                      f"{result}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from jaxserve.check import libtpu
    if not libtpu.importable():
        DUMP.mkdir(parents=True, exist_ok=True)
        env = libtpu.environment()
        env["LIBTPU_INIT_ARGS"] = f"{env.get('LIBTPU_INIT_ARGS', '')} --xla_mosaic_dump_to={DUMP}".strip()
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    main()
