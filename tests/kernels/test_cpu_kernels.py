"""The C++ kernels for XLA:CPU (kernels_cpu) against lax.top_k and their XLA references; building and falling back."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_cpu

GROUP = 32


def _rows(kind: str, vocab: int, rows: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, vocab)).astype(np.float32) * 3
    if kind == "ties":  # few distinct values: ties inside and at the edge of the top set
        x = np.round(x)
    elif kind == "masked":  # a grammar or allowed_token_ids leaves a few tokens, some rows none
        keep = rng.random((rows, vocab)) < 0.002
        keep[0] = False
        keep[1, :3] = True
        x = np.where(keep, x, -np.inf)
    elif kind == "extremes":  # constant rows, +inf, a single huge value
        x[0] = 0.5
        x[1, 7] = np.inf
        x[2, -1] = 3e38
        x[3] = -3e38
    return x.astype(np.float32)


def _maxima(x):
    return kernels_cpu.grouped(x, GROUP).max(-1)


def _both(x, width):
    kernel = jax.jit(lambda x: kernels_cpu.top_candidates(x, _maxima(x), width, GROUP))
    reference = jax.jit(lambda x: kernels_cpu.top_candidates_reference(x, _maxima(x), width, GROUP))
    return kernel(x), reference(x), jax.lax.top_k(x, width)


@pytest.mark.parametrize("kind", ["random", "ties", "masked", "extremes"])
@pytest.mark.parametrize("vocab,width", [(32000, 64), (1000 + 7, 64), (100, 64), (64, 64), (5000, 1), (3000, 200)])
def test_top_candidates_equal_top_k(kind, vocab, width):
    x = jnp.asarray(_rows(kind, vocab))
    (values, ids), (ref_values, ref_ids), (top, top_ids) = _both(x, width)
    # The kernel: exactly lax.top_k, ties in ascending index order.
    np.testing.assert_array_equal(np.asarray(values), np.asarray(top))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(top_ids))
    # The reference: the same values, each index one of its value's, no index twice; lax.top_k's indices where
    # the row's values are distinct.
    np.testing.assert_array_equal(np.asarray(ref_values), np.asarray(top))
    ref_ids = np.asarray(ref_ids)
    finite = np.isfinite(np.asarray(top))
    picked = np.take_along_axis(np.asarray(x), np.where(finite, ref_ids, 0), -1)
    np.testing.assert_array_equal(picked[finite], np.asarray(top)[finite])
    assert all(len(set(row[f])) == f.sum() for row, f in zip(ref_ids, finite))
    if kind == "random":
        np.testing.assert_array_equal(ref_ids, np.asarray(top_ids))


def test_the_sampler_runs_the_kernel_on_cpu():
    from jaxserve.core import sampler

    x = jnp.zeros((4, 5000), jnp.float32)
    text = jax.jit(lambda x: sampler._candidates(x, _maxima(x), 64)).lower(x).as_text()
    assert "jaxserve_top_candidates" in text


def test_build_failures_fall_back_to_the_references(tmp_path):
    """No compiler, a failing compiler, or JAXSERVE_CPU_KERNELS=0: enable() says False (a warning for the first
    two), and the sampler traces the XLA reference. Run in a fresh process, where nothing is registered yet."""
    script = textwrap.dedent(f"""
        import logging, os, jax, jax.numpy as jnp
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        import kernels_cpu
        from jaxserve.core import sampler
        results = []
        os.environ["JAXSERVE_CPU_KERNELS"] = "0"
        results.append(kernels_cpu.enable({str(tmp_path)!r}))
        del os.environ["JAXSERVE_CPU_KERNELS"]
        for cxx in ("no-such-compiler", "false"):
            os.environ["CXX"] = cxx
            results.append(kernels_cpu.enable({str(tmp_path)!r}))
        x = jnp.zeros((4, 5000), jnp.float32)
        text = jax.jit(lambda x: sampler._candidates(x, sampler._group_maxima(x)[0], 64)).lower(x).as_text()
        print("RESULTS", results, kernels_cpu.enabled(), "jaxserve_top_candidates" in text)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "JAXSERVE_CPU_KERNELS")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "RESULTS [False, False, False] False False" in out.stdout, out.stdout
    warnings = [line for line in out.stderr.splitlines() if line.startswith("WARNING C++ kernels for XLA:CPU")]
    assert len(warnings) == 2, out.stderr
    assert "no C++ compiler (no-such-compiler)" in warnings[0]
    assert list(tmp_path.iterdir()) == []  # a failed build leaves nothing behind


def test_a_build_is_reused(tmp_path):
    """The library is built once per source, jax and compiler: a second build finds it."""
    from kernels_cpu import build

    first = build._build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build._build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
