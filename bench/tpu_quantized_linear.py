"""What one quantized matmul costs on TPU by XLA's own account: `linear` (jaxserve/quantization/qarray.py) over one
Llama-3.1-8B MLP matrix (4096 x 14336), compiled with libtpu for a v5e chip on this CPU machine, next to the same
matrix in bfloat16 and to dequantizing the whole matrix first (`qarray.dequantize`, float32, then a dot).

For decode (T=1) and a prefill chunk (T=512) it prints the bytes the compiled program accesses (cost analysis) and
its temporaries. A decode step is bound by those bytes; a fused dequantization reads little more than the codes.
Run: python bench/tpu_quantized_linear.py (installs the pinned libtpu into the jaxserve cache folder on first use).
It measures no run time (no TPU here); it is not a test.
"""
import os
import sys


def main():
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from jaxserve.quantization import qarray, schemes

    device = topologies.get_topology_desc("v5e:2x2", platform="tpu").devices[0]
    placed = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(device))  # noqa: E731
    k, n = 4096, 14336
    dense = jax.ShapeDtypeStruct((k, n), jnp.bfloat16)
    weights = {"bfloat16": dense}
    for scheme in schemes.SCHEMES:
        weights[scheme] = schemes.WeightQuantization(scheme).abstract(dense, "w_down")

    def dequantized_first(x, w):
        return jnp.dot(x, qarray.dequantize(w, x.dtype), preferred_element_type=jnp.float32)

    print(f"one {k} x {n} matrix, bfloat16 activations, compiled for a TPU v5e chip")
    print(f"{'weights':10} {'formulation':22} {'T':>4} {'stored MB':>10} {'accessed MB':>12} {'temp MB':>8}")
    for t in (1, 512):
        x = placed(jax.ShapeDtypeStruct((t, k), jnp.bfloat16))
        for name, w in weights.items():
            w = jax.tree.map(placed, w)
            stored = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w)) / 1e6
            ways = [("linear", qarray.linear)]
            if isinstance(w, qarray.QArray) and w.group != k:
                ways.append(("dequantize, then dot", dequantized_first))
            for label, fn in ways:
                compiled = jax.jit(fn).trace(x, w).lower().compile()
                cost = compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                temp = compiled.memory_analysis().temp_size_in_bytes / 1e6
                print(f"{name:10} {label:22} {t:4} {stored:10.1f} {cost['bytes accessed'] / 1e6:12.1f} {temp:8.1f}",
                      flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from jaxserve.check import libtpu
    if not libtpu.importable():
        os.execve(sys.executable, [sys.executable, *sys.argv], libtpu.environment())
    main()
