"""Every Pallas TPU kernel compiles with Mosaic for v5e and v6e, on this CPU-only machine.

`python -m kernels_pallas.check_tpu` runs in a subprocess with the libtpu that the installed jax pins on its
path (jaxserve/check/libtpu.py installs it into a cache folder), so libtpu never enters the test process or the
venv.
"""
import pathlib
import subprocess
import sys

from jaxserve.check import libtpu

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_tpu_kernels_compile():
    proc = subprocess.run([sys.executable, "-m", "kernels_pallas.check_tpu"], cwd=REPO,
                          env=libtpu.environment(REPO), capture_output=True, text=True, timeout=1800)
    failed = [line for line in proc.stdout.splitlines() if not line.startswith("ok ")]
    assert proc.returncode == 0, "\n".join(failed[-60:]) + proc.stderr[-3000:]
    assert "all TPU kernels compiled" in proc.stdout, proc.stdout[-2000:]
