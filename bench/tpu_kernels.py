"""Our TPU attention kernel next to JAX's own (jax.experimental.pallas.ops.tpu.ragged_paged_attention), compiled
for v5e and v6e with libtpu on this CPU machine at serving shapes: which compiles, and in how long.

Both take the same cache layout ([pages, page_size, 2 * kv heads, head_dim]). JAX's kernel scalar-prefetches the
whole [max_num_seqs, pages_per_seq] block table into SMEM and writes no KV (the engine would need a second
kernel or scatter for that); ours reads one sequence's table row at a time and writes the step's K/V itself.
Run: python bench/tpu_kernels.py (installs the pinned libtpu into the jaxserve cache folder on first use).
Prints one line per (chip, shape, kernel); it is not a test, and it measures no run time (no TPU here).
"""
import os
import sys
import time

SHAPES = [  # (label, Hq, Hkv, D, page_size, max_model_len, max_num_seqs, tokens)
    ("Llama-3.1-8B tp1, 32k x 256 seqs, decode", 32, 8, 128, 128, 32768, 256, 256),
    ("Llama-3.1-8B tp1, 32k x 256 seqs, prefill 2048", 32, 8, 128, 128, 32768, 256, 2048),
    ("Llama-3.1-8B tp8, 128k x 64 seqs, page 16, decode", 4, 1, 128, 16, 131072, 64, 64),
    ("Qwen2.5-14B tp4, 32k x 256 seqs, page 16, decode", 10, 2, 128, 16, 32768, 256, 256),
]


def compile_seconds(fn, args, donate):
    t0 = time.perf_counter()
    import jax
    jax.jit(fn, donate_argnums=donate).trace(*args).lower().compile()
    return time.perf_counter() - t0


def main():
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as jax_rpa

    from kernels_pallas import tpu

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
            # JAX's kernel looks its block sizes up for the TPU it runs on (none here): give it ours.
            blocks = tpu.BLOCKS[chip]
            theirs = dict(num_kv_pages_per_block=max(1, blocks.block_kv // ps), num_queries_per_block=blocks.prefill_q_tile)
            kernels = {
                "jaxserve": (lambda *a: tpu.ragged_paged_attention(*a, sm_scale=d ** -0.5, generation=chip),
                             (q, new, new, kv, i32(t), i32(seqs), table, i32(seqs + 1), i32(1)), 3),
                "jax.experimental": (lambda *a: jax_rpa.ragged_paged_attention(*a, sm_scale=d ** -0.5, **theirs),
                                     (q, kv, i32(seqs), table, i32(seqs + 1), i32(1)), ()),
            }
            for name, (fn, args, donate) in kernels.items():
                try:
                    result = f"compiled in {compile_seconds(fn, args, donate):.1f} s"
                except Exception as e:  # a refusal is the result
                    lines = [ln for ln in str(e).splitlines() if ln.strip()]
                    result = "FAILED: " + (lines[0] if lines else type(e).__name__)[:160]
                print(f"{topo:8s} {label:52s} {name:17s} {result}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from jaxserve.check import libtpu
    if not libtpu.importable():
        os.execve(sys.executable, [sys.executable, *sys.argv], libtpu.environment())
    main()
