"""The process-wide caches (:mod:`reslab.caches`): each listed with what it keeps, made by the
module it names, emptied by one call; no module keeps a cache of its own beside them."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from reslab import caches

SRC = Path(__file__).resolve().parent.parent / "src" / "reslab"

#: module-level containers and functools caches that are not caches made through reslab.caches, and why
NOT_LISTED = {
    ("caches.py", "_MADE"): "the list of caches itself",
    ("nn/registry.py", "_REGISTRY"): "a registry: what was registered is never recomputed",
    ("nn/models.py", "_MODELS"): "a registry",
    ("nn/models.py", "_FAMILY"): "a registry",
    ("probe/runner.py", "_WORKER_BATCHES"): "a worker process's inputs, given once by its pool",
    ("study/launch/slurm.py", "_slurm_worker_class"): "a class made once: a second one would break pickling",
}


def test_every_listed_cache_is_made_by_its_module() -> None:
    for module, what in caches.CACHES.values():
        importlib.import_module(module)
        assert what
    assert set(caches.sizes()) == set(caches.CACHES)


def test_clear_empties_the_caches_named_or_all() -> None:
    from reslab.nn.blocks import BasicBlock
    from reslab.study.divergence import divergence_bounds

    bounds = divergence_bounds((2, 3), 0.05)
    BasicBlock(4, 4, technique="skipinit").norm_gain()  # whether its gain stands for its merge, per class
    before = caches.sizes()
    assert before["divergence.bounds"] >= 1 and before["blocks.gain_describes_merge"] >= 1
    caches.clear("divergence.bounds")
    after = caches.sizes()
    assert after["divergence.bounds"] == 0
    assert after["blocks.gain_describes_merge"] == before["blocks.gain_describes_merge"]
    assert divergence_bounds((2, 3), 0.05) == bounds  # computed again, the same
    caches.clear()
    assert set(caches.sizes().values()) == {0}
    with pytest.raises(ValueError, match="unknown caches"):
        caches.clear("no.such.cache")


def test_a_cache_must_be_listed_and_made_once() -> None:
    with pytest.raises(ValueError, match="not listed"):
        caches.new_cache("some.unlisted.cache")
    with pytest.raises(ValueError, match="already made"):
        caches.new_cache("datasets.decoded")


def _empty_container(node: ast.expr | None) -> bool:
    if isinstance(node, ast.Dict | ast.List):
        return not (node.keys if isinstance(node, ast.Dict) else node.elts)
    if isinstance(node, ast.Call) and not node.args and not node.keywords:
        return ast.unparse(node.func).split(".")[-1] in ("dict", "set", "list", "defaultdict", "OrderedDict")
    return False


def test_no_module_keeps_a_cache_of_its_own() -> None:
    """A module-level container made empty at import, or a module-level function under a
    functools cache, is a cache the listing would miss: it is made through reslab.caches instead."""
    found = set()
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign | ast.AnnAssign) and _empty_container(node.value):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found |= {(rel, t.id) for t in targets if isinstance(t, ast.Name)}
            if isinstance(node, ast.FunctionDef):
                words = [ast.unparse(d) for d in node.decorator_list]
                if any("cache" in w and not w.startswith("memoize(") for w in words):
                    found.add((rel, node.name))
    assert found <= set(NOT_LISTED), sorted(found - set(NOT_LISTED))


def test_cache_keys_are_equal_exactly_when_the_settings_are() -> None:
    from reslab.caches import cache_key

    a = {"lr": 0.1, "width": 1, "aug": ["crop", "flip"], "extra": {"x": None, "y": "s"}}
    b = {"extra": {"y": "s", "x": None}, "aug": ["crop", "flip"], "width": 1, "lr": 0.1}
    assert cache_key(a) == cache_key(b) and hash(cache_key(a)) == hash(cache_key(b))
    assert len({cache_key(v) for v in (1, 1.0, True, "1", None)}) == 5  # Python's 1 == 1.0 == True
    assert cache_key({**a, "aug": ["flip", "crop"]}) != cache_key(a)  # a list's order matters
    assert cache_key(["cpu", object]) == cache_key(["cpu", object])
