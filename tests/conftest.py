"""Shared fixtures: an isolated LOC3R_HOME, the tiny tokenizer and the tiny bundle."""

from __future__ import annotations

import contextlib
import io
from importlib import resources
from pathlib import Path

import pytest
import torch

from llm_setup import LLM_CHUNK, LLM_CONTEXT

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
def cpu_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported for the cpu target with an fp32 LLM (shared: copy it to damage it)."""
    from loc3r.export import cli as export_cli

    out = tmp_path_factory.mktemp("export") / "cpu"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = export_cli.main(["--model", "tiny", "--target", "cpu", "--out", str(out), "--llm", "fp32"])
    assert code == 0, stderr.getvalue()
    (out.parent / "stdout.txt").write_text(stdout.getvalue())  # what it printed: tests/test_export_preflight.py
    (out.parent / "stderr.txt").write_text(stderr.getvalue())
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer() -> TextTokenizer:
    corpus = resources.files("loc3r").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    return train_tiny_tokenizer(corpus.splitlines())


# -- the LLM decoder in every form, exported once per session from a trained tiny Qwen2 ----

@pytest.fixture(scope="session")
def trained_llm() -> torch.nn.Module:
    """The benchmark's tiny Qwen2 trained on a Markov chain: its top-1 is confident."""
    from loc3r.bench.llm_quant import TINY, peaked_qwen2

    return peaked_qwen2(TINY, steps=80, lr=1e-2, batch=8, length=24)


@pytest.fixture(scope="session")
def llm_exports(trained_llm: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """name -> (folder, manifest fragment): the CPU forms and the GPU targets' int4 form."""
    from loc3r.export.llm import LLMForm, LLMSource, export_llm

    forms = {
        "fp32": LLMForm("cpu", "fp32", "fp32"),
        "int8": LLMForm("cpu", "int8", "int8", accuracy_level=4),
        "int4": LLMForm("cpu", "int4", "int4", accuracy_level=4),
        "int4-cuda": LLMForm("cuda", "int4", "int4"),
    }
    source = LLMSource.from_model(trained_llm, tmp_path_factory.mktemp("llm_source"))
    exports = {}
    for name, form in forms.items():
        folder = tmp_path_factory.mktemp(f"llm_{name}")
        exports[name] = folder, export_llm(source, folder, form, LLM_CONTEXT, LLM_CHUNK, probe=True)
    return exports
@pytest.fixture(scope="session")
def jetson_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported for the Jetson AGX Orin (FP16 graphs, device build plan), no LLM.
    Tests copy it before changing anything in it."""
    from loc3r.export import cli as export_cli

    out = tmp_path_factory.mktemp("jetson") / "orin"
    assert export_cli.main(["--model", "tiny", "--target", "jetson-orin", "--out", str(out), "--llm", "none"]) == 0
    return out
