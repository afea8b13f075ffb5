"""Fuzzing bundle configs and export manifests: a damaged file gives a working model or a
one-line ``ModelError``/``InputError``, nothing else (no KeyError, no TypeError, no huge
allocation, no path outside the folder).

Hypothesis mutates the tiny bundle's ``config.json`` and a real export's ``manifest.json``
(a few edits each: a node replaced by another JSON value, deleted, or a list emptied), then
opens them the way ``loc3r-run`` does: ``load_bundle`` + the PyTorch weights, and
``Pipeline.from_pretrained(backend="onnxruntime")`` (manifest checks, file verification, ONNX
sessions). Files are hard links to the originals, so an example costs little but the load.

CI runs ``LOC3R_FUZZ_ARTIFACT_CASES`` (default 40) examples of each; a longer run::

    LOC3R_FUZZ_ARTIFACT_CASES=1000 python -m pytest -q tests/test_fuzz_artifacts.py
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from loc3r.errors import InputError, ModelError
from loc3r.export.manifest import MANIFEST_FILE
from loc3r.models.bundle import load_bundle
from loc3r.models.tiny import ensure_tiny_bundle
from loc3r.runtime.pipeline import Pipeline

CASES = int(os.environ.get("LOC3R_FUZZ_ARTIFACT_CASES", "40"))
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2, 3, 64, 2**31, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["", "../x", "/etc/passwd", "vision.onnx", "llm/decoder.onnx", "0" * 64, "fp16", "frames"]),
)
_VALUES = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                       max_leaves=8)


def nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every node of a JSON tree (the root's is ``()``)."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from nodes(child, (*path, key))


def mutated(data: Any, draw: st.DrawFn) -> Any:
    """``data`` (a parsed JSON document) after one to three random edits: a node replaced,
    deleted, emptied, or (a number) nudged, so that near-valid documents come up too."""
    data = json.loads(json.dumps(data))
    chooser = draw(st.randoms(use_true_random=False))  # uniform over the nodes (sampled_from favours the first)
    for _ in range(draw(st.integers(1, 3))):
        path = chooser.choice(list(nodes(data))[1:])
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        node = parent[path[-1]]
        action = draw(st.sampled_from(["replace", "nudge", "delete", "empty"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "empty" and isinstance(node, (list, dict)):
            node.clear()
        elif action == "nudge" and isinstance(node, (int, float)) and not isinstance(node, bool):
            parent[path[-1]] = draw(st.sampled_from([node + 1, node - 1, node * 2, -node, node / 2]))
        else:
            parent[path[-1]] = draw(_VALUES)
    return data


def linked_copy(source: Path, target: Path, damaged: str, text: str) -> Path:
    """``source`` with hard-linked files, ``damaged`` written anew with ``text``."""
    shutil.copytree(source, target, copy_function=os.link)
    (target / damaged).unlink()
    (target / damaged).write_text(text, encoding="utf-8")
    return target


def dumps(data: Any) -> str:
    return json.dumps(data)  # NaN and Infinity as Python writes them: the reader must cope


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return ensure_tiny_bundle()


@FUZZ
@given(data=st.data())
def test_damaged_bundle_configs_load_or_fail_in_one_line(tiny_dir: Path, data: st.DataObject) -> None:
    config = mutated(json.loads((tiny_dir / "config.json").read_text()), data.draw)
    with tempfile.TemporaryDirectory() as tmp:
        folder = linked_copy(tiny_dir, Path(tmp) / "bundle", "config.json", dumps(config))
        try:
            bundle = load_bundle(folder)
            model = bundle.model
        except (ModelError, InputError) as exc:
            event(f"refused: {exc.problem.split(' is ')[0][:60]}")  # --hypothesis-show-statistics
            return
        event("loaded")
        assert sum(p.numel() for p in model.parameters()) > 0


@FUZZ
@given(data=st.data())
def test_damaged_manifests_open_or_fail_in_one_line(cpu_export: Path, data: st.DataObject) -> None:
    manifest = mutated(json.loads((cpu_export / MANIFEST_FILE).read_text()), data.draw)
    with tempfile.TemporaryDirectory() as tmp:
        folder = linked_copy(cpu_export, Path(tmp) / "engines", MANIFEST_FILE, dumps(manifest))
        try:
            pipeline = Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=folder)
        except (ModelError, InputError) as exc:
            event(f"refused: {exc.problem.split(':')[-1][:60]}")
            return
        event("opened")
        assert pipeline.artifacts != pipeline.bundle.checksum  # keyed on the export's files
