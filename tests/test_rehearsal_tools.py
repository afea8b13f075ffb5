"""The dress rehearsal's tools: real-size shapes, the synthetic Qwen2 tokenizer files, the
measured child process, and (slow) the whole rehearsal on tiny widths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loc3r.bench import child, real_size
from loc3r.bench.fabricate import (
    LLAVA_VIDEO_7B_QWEN2,
    QWEN2_CHAT_TOKENS,
    TowerSizes,
    llava_next_shapes,
    synthetic_byte_level_bpe,
    write_qwen2_tokenizer_files,
)
from loc3r.models.convert_tokenizer import loc3r_tokenizer


def test_llava_video_7b_shapes_add_up_to_the_published_sizes() -> None:
    shapes = llava_next_shapes(LLAVA_VIDEO_7B_QWEN2, TowerSizes())
    llm = sum(math.prod(s) for n, s in shapes.items() if n.startswith(("model.embed_tokens", "model.layers", "model.norm", "lm_head")))
    assert llm == 7_615_616_512  # Qwen2-7B with its untied lm_head
    assert shapes["model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight"] == (729, 1152)
    assert shapes["model.layers.27.self_attn.k_proj.weight"] == (512, 3584)  # 4 KV heads x 128
    assert shapes["model.mm_projector.0.weight"] == (3584, 1152)
    assert "model.layers.28.mlp.up_proj.weight" not in shapes


def test_synthetic_tokenizer_files_load_as_qwen2s(tmp_path: Path) -> None:
    vocab, merges = synthetic_byte_level_bpe(70_000)
    assert len(vocab) == 70_000 and len(merges) == 70_000 - 256
    added = [(token, 70_000 + k) for k, token in enumerate(QWEN2_CHAT_TOKENS)]
    write_qwen2_tokenizer_files(tmp_path, vocab, merges, added)
    tokenizer = loc3r_tokenizer(tmp_path, vocab_size=70_016)
    assert (tokenizer.end_of_text_id, tokenizer.im_start_id, tokenizer.im_end_id) == (70_000, 70_001, 70_002)
    assert (tokenizer.pos_id, tokenizer.ori_id) == (70_003, 70_004)
    ids = tokenizer.encode("user\nWhere is the chair?")
    assert len(ids) < 20 and tokenizer.decode(ids) == "user\nWhere is the chair?"  # merged pairs and triples
    typed = tokenizer.encode("<|im_end|>")  # user text never becomes a control token
    assert 70_002 not in typed and tokenizer.decode(typed) == "<|im_end|>"


def allocate_and_write(argv: list[str]) -> int:
    """A child phase: hold ``argv[0]`` MB, write ``argv[1]`` MB to ``argv[2]``, exit ``argv[3]``."""
    import os

    held = bytearray(int(argv[0]) * 2**20)
    held[::4096] = b"x" * len(held[::4096])
    with open(argv[2], "wb") as stream:
        stream.write(os.urandom(int(argv[1]) * 2**20))
        stream.flush()
        os.fsync(stream.fileno())
    return int(argv[3])


@pytest.mark.parametrize("code", [0, 3])
def test_child_reports_peak_rss_and_bytes_written(tmp_path: Path, code: int) -> None:
    report = tmp_path / "report.json"
    target = f"{__name__}:allocate_and_write"
    assert child.main([str(report), target, "200", "30", str(tmp_path / "out.bin"), str(code)]) == code
    measured = json.loads(report.read_text())
    assert measured["exit"] == code and measured["wall_s"] > 0
    assert measured["peak_rss_bytes"] >= 200 * 2**20
    assert measured["write_bytes"] >= 30 * 2**20


def allocate_in_a_subprocess(argv: list[str]) -> int:
    """Hold ``argv[0]`` MiB here, then run a subprocess that holds ``argv[1]`` MiB for 0.5 s."""
    import subprocess
    import sys

    held = bytearray(int(argv[0]) * 2**20)
    held[::4096] = b"x" * len(held[::4096])  # touched: resident
    program = (f"import time; held = bytearray({int(argv[1])} * 2**20); held[::4096] = b'x' * len(held[::4096]); "
               "time.sleep(0.5)")
    return subprocess.run([sys.executable, "-c", program], check=True).returncode


@pytest.mark.parametrize(("parent_mib", "child_mib"), [(600, 60), (0, 400)], ids=["small-child", "large-child"])
def test_child_reports_the_own_peak_rss_of_its_subprocesses(parent_mib: int, child_mib: int, tmp_path: Path) -> None:
    """A phase whose work runs in a subprocess (the LLM builder) is measured there too, by
    that subprocess's own high-water mark: a 60 MiB subprocess of a 600 MiB process is
    reported as 60 MiB plus an interpreter (under 60 MiB here), not 600.

    Mutation checked: ``peak_rss_subprocess_bytes`` read from ``RUSAGE_CHILDREN``'s
    ``ru_maxrss`` (which starts from the parent's peak at ``exec``): ``small-child`` fails.
    """
    import subprocess
    import sys

    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "loc3r.bench.child", str(report), f"{__name__}:allocate_in_a_subprocess",
               str(parent_mib), str(child_mib)]
    subprocess.run(command, check=True, cwd=Path(__file__).parent)  # where this module imports from
    measured = json.loads(report.read_text())
    mib = measured["peak_rss_subprocess_bytes"] / 2**20
    assert child_mib <= mib < child_mib + 60
    assert measured["peak_rss_bytes"] / 2**20 >= parent_mib


def test_a_resumed_rehearsal_runs_only_what_did_not_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--resume``: phases recorded as completed in the work folder are skipped, the failed
    one and those after it run; a folder rehearsed with other settings is refused."""
    calls: list[str] = []
    failing = {"export_cpu"}

    def run_phase(name: str, target: str, args: list[str], work: Path, outputs: list[Path]) -> tuple[real_size.Phase, str]:
        calls.append(name)
        if name.startswith("export_"):  # an export's folder holds its manifest
            outputs[0].mkdir(exist_ok=True)
            (outputs[0] / "manifest.json").write_text("{}")
        answer = {"model": {}, "timings": {}, "answer_token_ids": [1]}
        return real_size.Phase(name, target, exit=1 if name in failing else 0), json.dumps(answer)

    monkeypatch.setattr(real_size, "run_phase", run_phase)
    monkeypatch.setattr(real_size, "artifact_rows", lambda export, bundle, manifest: [{"file": export.name}])
    monkeypatch.setattr(real_size, "bundle_parameters", lambda bundle: {"w": 7})
    monkeypatch.setattr(real_size, "export_checks", lambda manifest: {"llm": {"top1_match": True}})
    settings = ("tiny", 1, tmp_path, 2, "int4", 4)
    first = real_size.rehearse(*settings, keep=True)
    assert calls == list(real_size.PHASES[:5]) and [p["exit"] for p in first["phases"]] == [0, 0, 0, 0, 1]
    failing.clear()
    calls.clear()
    second = real_size.rehearse(*settings, keep=True)
    assert calls == ["export_cpu", "run_onnxruntime", "run_torch"]
    assert [p["name"] for p in second["phases"]] == list(real_size.PHASES) and real_size.completed(second, 20.0)
    assert second["artifacts"] == {"jetson": [{"file": "export_jetson"}], "cpu": [{"file": "export_cpu"}]}
    assert second["checks"] == {"jetson": {"llm": {"top1_match": True}}, "cpu": {"llm": {"top1_match": True}}}
    assert second["bundle_parameters"] == 7 and set(second["answers"]) == {"run_onnxruntime", "run_torch"}
    with pytest.raises(SystemExit, match="holds a rehearsal with other settings"):
        real_size.rehearse("tiny", 2, tmp_path, 2, "int4", 4, keep=True)


def test_resume_never_takes_a_folder_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The resumed folder is removed once the rehearsal completes: one holding anything else
    (a home folder, a file) is refused in one line before anything runs."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    for folder in (home, home / "thesis.tex"):
        with pytest.raises(SystemExit) as stopped:
            real_size.main(["--preset", "tiny", "--resume", str(folder), "--out", str(tmp_path / "out")])
        assert stopped.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--resume {folder} holds files no rehearsal wrote" in err
    assert (home / "thesis.tex").read_text() == "years of work" and not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert real_size.resumable(tmp_path / "new") and real_size.resumable(empty)
    (home / real_size.PROGRESS_FILE).write_text("{}")
    assert real_size.resumable(home)  # a folder a rehearsal was resumed in


@pytest.mark.slow
def test_rehearsal_on_tiny_widths(tmp_path: Path) -> None:
    """Every phase of the rehearsal completes and is measured (the real run: benchmarks/results)."""
    out = tmp_path / "out"
    assert real_size.main(["--preset", "tiny", "--llm-layers", "1", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    results = json.loads((out / "real_size_tiny.json").read_text())
    assert [p["name"] for p in results["phases"]] == [
        "write_llava", "write_cut3r", "convert", "export_jetson", "export_cpu", "run_onnxruntime", "run_torch"]
    assert all(p["exit"] == 0 and p["peak_rss_bytes"] > 0 and p["wall_s"] > 0 for p in results["phases"])
    files = {row["file"]: row for row in results["artifacts"]["cpu"]}
    assert files["cut3r_step.onnx + .data"]["predicted"] > 0
    assert files["llm/embeddings.safetensors"]["within"] is True
    jetson = {row["file"]: row for row in results["artifacts"]["jetson"]}
    # FP16 graphs are predicted at what the FP16 target loads (at tiny widths their FP32 pins weigh more)
    for graph in ("cut3r_encoder", "cut3r_step", "vision"):
        fp32, fp16 = jetson[f"{graph}.onnx + .data"], jetson[f"{graph}.fp16.onnx + .data"]
        assert fp16["predicted"] * 2 == fp32["predicted"] and fp16["ratio"] == fp16["bytes"] / fp16["predicted"]
    assert set(results["answers"]) == {"run_onnxruntime", "run_torch"}
    checks = results["checks"]
    assert checks["cpu"]["llm"]["tokens"] == [12, 4] and checks["cpu"]["llm"]["exact_form"] is False  # int4 decoder
    assert checks["jetson"]["graphs"]["cut3r_step"]["runs"] == 14 and checks["cpu"]["graphs"]["vision"]["fp16_relative"] is None
    assert 0 < checks["jetson"]["graphs"]["vision"]["fp16_relative"] < 0.05
    assert list(tmp_path.glob("loc3r_real_size_*")) == []  # the work folder is removed
    assert [row["phase"] for row in real_size.extrapolate(results)] == [p["name"] for p in results["phases"]]
    assert "## Extrapolation to 2 LLM layers" in (out / "real_size_tiny.md").read_text()
