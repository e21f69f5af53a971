"""Imports flow one way: server -> jaxserve -> kernels_pallas / kernels_cpu; inside jaxserve, the text side sees only the core's
outputs, and model families see neither the core nor the text side."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imports(folder: str) -> dict[str, set[tuple[str, str]]]:
    """file -> {(module, name)} of its absolute imports (name "" for `import module`)."""
    out = {}
    for path in (ROOT / folder).rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(a.name, "") for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found |= {(node.module, a.name) for a in node.names}
        out[str(path.relative_to(ROOT))] = found
    return out


def _top(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("kernels", ["kernels_pallas", "kernels_cpu"])
def test_kernels_import_nothing_of_the_engine(kernels):
    for path, found in _imports(kernels).items():
        assert {_top(m) for m, _ in found} & {"jaxserve", "server", "torch", "transformers"} == set(), path


def test_jaxserve_never_imports_the_server():
    for path, found in _imports("jaxserve").items():
        assert all(_top(m) != "server" for m, _ in found), path


def test_the_text_side_sees_only_the_cores_outputs():
    allowed = {("jaxserve.core.engine_core", "CoreOutput"), ("jaxserve.core.engine_core", "SampleUpdate")}
    for path, found in _imports("jaxserve/text").items():
        core = {(m, n) for m, n in found if m.startswith("jaxserve.core")}
        assert core <= allowed, (path, core - allowed)


def test_model_families_see_neither_the_core_nor_the_text_side():
    for path, found in _imports("jaxserve/models").items():
        assert not any(m.startswith(("jaxserve.core", "jaxserve.text", "jaxserve.engine")) for m, _ in found), path


def test_every_model_type_has_a_family_module():
    from jaxserve import models

    for model_type in models.FAMILIES:
        family = models.family(model_type)
        assert all(callable(getattr(family, f)) for f in ("params_from_hf", "hidden_states", "final_logits"))
