"""Every Pallas TPU kernel compiles with Mosaic for v5e and v6e, on this CPU-only machine.

Self-contained: installs the libtpu wheel that the installed jax's [tpu] extra pins into a cache folder
($JAXSERVE_CACHE_DIR/libtpu-<ver>, default ~/.cache/jaxserve/libtpu-<ver>) if absent, then runs
`python -m kernels_pallas.check_tpu` in a subprocess with only that folder added to PYTHONPATH, so
libtpu never enters the test process or the venv.
"""
import importlib.metadata
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]


def libtpu_requirement() -> str:
    """What jax[tpu] pins for the installed jax, e.g. "libtpu==0.0.42.*" for jax 0.10.2."""
    pins = [r.split(";")[0].strip() for r in importlib.metadata.requires("jax")
            if r.startswith("libtpu") and 'extra == "tpu"' in r]
    assert len(pins) == 1 and "==" in pins[0], f"jax declares no single libtpu pin for its [tpu] extra: {pins}"
    return pins[0]


def libtpu_dir():
    root = pathlib.Path(os.environ.get("JAXSERVE_CACHE_DIR", pathlib.Path.home() / ".cache" / "jaxserve"))
    requirement = libtpu_requirement()
    target = root / f"libtpu-{requirement.split('==')[1].rstrip('*').rstrip('.')}"
    if not (target / "libtpu").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=root))       # install aside, then move: no half folder
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                        str(tmp), requirement], check=True)
        tmp.rename(target)
    return target


def test_tpu_kernels_compile():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(libtpu_dir()), str(REPO)]),
               TPU_WORKER_HOSTNAMES="localhost")              # silences libtpu's multi-host probe
    proc = subprocess.run([sys.executable, "-m", "kernels_pallas.check_tpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    failed = [line for line in proc.stdout.splitlines() if not line.startswith("ok ")]
    assert proc.returncode == 0, "\n".join(failed[-60:]) + proc.stderr[-3000:]
    assert "all TPU kernels compiled" in proc.stdout, proc.stdout[-2000:]
