"""The C++ decode attention for XLA:CPU (kernels_cpu.paged_attention) against the reference attention and the naive
numpy spec, on the kernel tests' random ragged batches (float32 caches)."""
import types

import jax
import numpy as np
import pytest

import kernels_cpu
from kernels_cpu.paged_attention import TARGET
from kernels_pallas import reference
from test_attention import CASES, options, random_batch

FLOAT32 = [name for name, case in CASES.items() if case[4] == np.float32]


@pytest.mark.parametrize("name", FLOAT32)
def test_kernel_gives_the_reference_attention(kv, name):
    """Decode-only and mixed batches (a prefill chunk, padding tokens and sequences), windows and soft caps: every
    token's output equals the reference's, padding rows zero."""
    b = random_batch(kv, name, seed=11)
    q, k, v, cache, slots, kv_lens, tables, cu, num_seqs = kv.args(b)
    written = reference.write_kv(cache, k, v, slots)
    got = jax.jit(lambda *a: kernels_cpu.paged_attention(*a, **options(name)))(q, written, kv_lens, tables, cu,
                                                                             num_seqs)
    want = reference.attend(q, written, kv_lens, tables, cu, num_seqs, **options(name))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(got), kv.naive(b, **options(name)), atol=2e-5, rtol=2e-5)
    valid = int(b.cu_q_lens[int(b.num_seqs[0])])
    assert valid < q.shape[0] or CASES[name][7]
    assert not np.asarray(got[valid:]).any()


def _engine_attention(kv, name):
    """The engine's attention (models/attention.py, reference backend) over batch `name`: (function of q and the
    cache, its arguments)."""
    from jaxserve.models import attention

    b = random_batch(kv, name)
    q, k, v, cache, *rest = kv.args(b)
    batch = types.SimpleNamespace(**dict(zip(("slot_mapping", "kv_lens", "block_tables", "cu_q_lens", "num_seqs"),
                                             rest)))
    cfg = types.SimpleNamespace(sm_scale=q.shape[-1] ** -0.5, attn_logit_softcapping=None)
    backend, window = attention.Backend("reference"), CASES[name][5]

    def run(q, cache):
        return attention.paged_attention(q, k, v, cache, batch, cfg, backend, window)

    return jax.jit(run), (q, cache), b


@pytest.mark.parametrize("name", ["p16-gqa3-d64-f32-decode", "p16-mha-d64-f32"])
def test_engine_attention_uses_the_kernel_on_cpu(kv, name):
    """Float32 batches, decode-shaped or with a prefill chunk, go to the kernel (the cache written first, as the
    reference writes it); a TPU lowering holds no CPU call."""
    run, args, b = _engine_attention(kv, name)
    assert TARGET in run.lower(*args).as_text()
    out, written = run(*args)
    np.testing.assert_allclose(np.asarray(out), kv.naive(b, **options(name)), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(written), kv.naive_cache(b))
    assert TARGET not in run.trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def test_a_tokens_output_does_not_depend_on_its_batch(kv):
    """The same token attends to the same numbers bit for bit whether its step holds only it or a prefill chunk and
    other sequences too (the engine relies on it: overlapping steps changes their shapes)."""
    name = "p16-mha-d64-f32"
    b = random_batch(kv, name, seed=12)
    q, k, v, cache, slots, kv_lens, tables, cu, num_seqs = kv.args(b)
    written = reference.write_kv(cache, k, v, slots)
    call = jax.jit(lambda *a: kernels_cpu.paged_attention(*a, **options(name)))
    whole = np.asarray(call(q, written, kv_lens, tables, cu, num_seqs))
    for s in range(int(num_seqs[0])):
        first, last = int(cu[s]), int(cu[s + 1])
        alone = call(q[first:last], written, kv_lens[s:s + 1], tables[s:s + 1],
                     np.asarray([0, last - first], np.int32), np.asarray([1], np.int32))
        np.testing.assert_array_equal(np.asarray(alone), whole[first:last])
