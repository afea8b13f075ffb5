"""Shared fixtures: an isolated LOC3R_HOME, the tiny tokenizer and the tiny bundle."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from loc3r.models.tokenizer import TextTokenizer, train_tiny_tokenizer


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session builds its own caches and tiny bundle."""
    home = tmp_path_factory.mktemp("loc3r_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("LOC3R_HOME", str(home))
    yield home
    mp.undo()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> TextTokenizer:
    corpus = resources.files("loc3r").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    return train_tiny_tokenizer(corpus.splitlines())


@pytest.fixture(scope="session")
def jetson_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported for the Jetson AGX Orin (FP16 graphs, device build plan), no LLM.
    Tests copy it before changing anything in it."""
    from loc3r.export import cli as export_cli

    out = tmp_path_factory.mktemp("jetson") / "orin"
    assert export_cli.main(["--model", "tiny", "--target", "jetson-orin", "--out", str(out), "--llm", "none"]) == 0
    return out
