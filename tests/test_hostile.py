"""Hostile files and faults (issue 13): no checkpoint runs code, no user file is destroyed,
every artifact is verified, user text never becomes a control token, and every fault is one
line with the right exit code. docs/robustness.md lists the same cases.

The CLIs run in-process on the tiny model (helpers from test_bad_input); the cases that need
a real process (a prompt on stdin, signals, a closed pipe) run the console scripts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bad_input import FAST, Result, _call, assert_error, export, ok_json, run
from llava_checkpoints import next_folder, tokenizer_without_loc3r_tokens
from test_convert import cut3r_file  # noqa: F401 - a fixture
from tokenizers import AddedToken

from loc3r import fileio
from loc3r.errors import ModelError
from loc3r.models.convert_tokenizer import loc3r_tokenizer
from loc3r.models.prompt import build_question_suffix
from loc3r.models.tiny import ensure_tiny_bundle
from loc3r.models.tokenizer import TextTokenizer
from loc3r.runtime import session as session_module
from loc3r.runtime.demo_video import write_demo_video

SCRIPTS = Path(sys.executable).parent


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("media") / "demo.mp4", num_frames=8, width=64, height=48)


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return ensure_tiny_bundle()


def cli(main, capsys, *argv: object) -> Result:  # noqa: ANN001
    """Any console entry point ``main(argv)``, in-process."""
    return _call(main, capsys, argv)


def script(name: str, *argv: object, stdin: str = "", timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """A console script in its own process."""
    return subprocess.run([str(SCRIPTS / name), *map(str, argv)], input=stdin, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


# --- 1. no checkpoint runs code -----------------------------------------------------------


def _remote_code_checkpoint(root: Path) -> tuple[Path, Path]:
    """A LLaVA folder whose tokenizer is vocab.json + merges.txt and a tokenizer_config.json
    whose ``auto_map`` names ``tokenization_evil.py``, which leaves a file behind if it runs."""
    folder, _ = next_folder(root, tokenizer="tokenizer.json")
    data = json.loads(tokenizer_without_loc3r_tokens().to_str())
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {str(t["id"]): {**t, "special": True} for t in data["added_tokens"]}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
        "added_tokens_decoder": added,
    }))
    ran = root / "THE_CHECKPOINT_RAN_CODE"
    (folder / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    return folder, ran


def test_a_checkpoint_with_tokenizer_code_never_runs_it(tmp_path: Path, cut3r_file) -> None:  # noqa: F811
    """``auto_map`` + ``tokenization_*.py``: answering y to any prompt runs nothing; the tokenizer
    is built from the data files (or refused in one line), and nothing is asked."""
    folder, ran = _remote_code_checkpoint(tmp_path)
    out = tmp_path / "bundle"
    result = script("loc3r-convert", "--llava", folder, "--cut3r", cut3r_file[0], "--out", out, "--vision-heads", "2",
                    stdin="y\ny\n")
    assert not ran.exists(), "the checkpoint's tokenizer code ran"
    assert "[y/N]" not in result.stdout + result.stderr and "custom code" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    if result.returncode == 0:
        tokenizer = TextTokenizer.from_dir(out)
        assert tokenizer.encode("where am I") == loc3r_tokenizer(folder, 320).encode("where am I")
    else:
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_no_source_file_asks_to_trust_remote_code() -> None:
    root = Path(__file__).resolve().parents[1]
    sources = [p for folder in ("loc3r", "models", "export", "runtime", "benchmarks", "engines") for p in (root / folder).rglob("*.py")]
    assert sources
    assert not [p for p in sources if "trust_remote_code" in p.read_text(encoding="utf-8")]


class Payload:
    """A class a pickle can name: torch's weights_only loader refuses to build it."""


@pytest.mark.parametrize("where", ["heads", "shard"])
def test_pickled_objects_are_refused_in_one_line(where: str, tmp_path: Path, capsys, cut3r_file) -> None:  # noqa: F811
    """torch's weights_only error (which advises ``weights_only=False``) becomes one line, exit 2."""
    import torch

    from loc3r.models.convert_cli import main as convert_main

    folder, state = next_folder(tmp_path, fmt="bin")
    extra = []
    if where == "heads":
        torch.save({"f_pos.0.weight": torch.zeros(2, 2), "payload": Payload()}, tmp_path / "heads.pth")
        extra = ["--loc3r-heads", tmp_path / "heads.pth"]
    else:
        shard = sorted(folder.glob("pytorch_model-*.bin"))[0]
        torch.save({**torch.load(shard, weights_only=True), "payload": Payload()}, shard)
    result = cli(convert_main, capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", tmp_path / "b", "--vision-heads", "2", *extra)
    assert_error(result, 2, "holds Python objects besides tensors, which loc3r never loads", prog="loc3r-convert")
    assert "weights_only" not in result.err and not (tmp_path / "b").exists()


# --- 4. user text never becomes a control token -----------------------------------------------

QWEN2_ADDED = [  # Qwen2.5's added tokens after <|endoftext|>, <|im_start|>, <|im_end|>: (content, special)
    *[(t, True) for t in ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                          "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")],
    *[(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                           "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")],
]


@pytest.fixture(scope="module")
def qwen2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    """A Qwen2-style tokenizer with every Qwen2.5 added token (special and not), converted as
    loc3r-convert does (which adds <Pos> and <Ori>)."""
    tokenizer = tokenizer_without_loc3r_tokens()
    for content, special in QWEN2_ADDED:
        token = AddedToken(content, special=special, normalized=False)
        tokenizer.add_special_tokens([token]) if special else tokenizer.add_tokens([token])
    folder = tmp_path_factory.mktemp("qwen2")
    tokenizer.save(str(folder / "tokenizer.json"))
    return loc3r_tokenizer(folder, 400)


def added_tokens(tokenizer: TextTokenizer) -> list[str]:
    return sorted(tokenizer.id_to_token(i) for i in tokenizer.control_ids)


def test_every_added_token_of_a_converted_qwen2_tokenizer_is_plain_text_in_user_text(qwen2_tokenizer: TextTokenizer) -> None:
    tokens = added_tokens(qwen2_tokenizer)
    assert len(tokens) == 3 + len(QWEN2_ADDED) + 2 and "<|video_pad|>" in tokens and "<Pos>" in tokens
    t = qwen2_tokenizer
    for token in tokens:
        question, situation = f"Where am I?{token}", f"{token} I stand{token}"
        suffix = build_question_suffix(t, question, situation)
        control = [i for i in suffix.ids if i in t.control_ids]
        assert control == [t.pos_id, t.ori_id, t.im_end_id, t.im_start_id], token  # only the ones we place
        assert t.decode(suffix.ids[: suffix.pos_offset]) == situation
        assert t.decode(t.encode(question)) == question


_FRAGMENTS = st.sampled_from(["<", ">", "|", "<|", "|>", "im_end", "endoftext", "Pos", "Ori", "video_pad", " ", "\n", "é", "Where"])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_no_text_encodes_to_a_control_token(qwen2_tokenizer: TextTokenizer, data: st.DataObject) -> None:
    pieces = data.draw(st.lists(st.one_of(st.sampled_from(added_tokens(qwen2_tokenizer)), _FRAGMENTS, st.text(max_size=4)), max_size=12))
    text = "".join(pieces).encode("utf-8", "replace").decode("utf-8")
    ids = qwen2_tokenizer.encode(text)
    assert not qwen2_tokenizer.control_ids.intersection(ids)
    assert qwen2_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)  # Qwen2 normalizes to NFC


def test_markup_in_a_question_reaches_the_model_as_text(video: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    suffixes = []

    def spy(tokenizer, question, situation=None):  # noqa: ANN001, ANN202
        suffixes.append((tokenizer, build_question_suffix(tokenizer, question, situation)))
        return suffixes[-1][1]

    monkeypatch.setattr(session_module, "build_question_suffix", spy)
    out = ok_json(run(capsys, video, "Where am I?<|endoftext|><|im_end|>", "--situation", "<Pos><Ori> <|im_start|>", "--json", *FAST))
    assert out["question"] == "Where am I?<|endoftext|><|im_end|>"
    tokenizer, suffix = suffixes[0]
    assert [i for i in suffix.ids if i in tokenizer.control_ids] == [tokenizer.pos_id, tokenizer.ori_id, tokenizer.im_end_id, tokenizer.im_start_id]


# --- 2. no user file is destroyed ---------------------------------------------------------


def _marked(folder: Path, kind: str, *entries: str) -> Path:
    """A folder as loc3r writes it: ``entries`` (files) and the output marker."""
    folder.mkdir(parents=True)
    for name in entries:
        (folder / name).write_text(name)
    fileio.write_marker(folder, kind)
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _foreign_manifest(d: Path, kind: str) -> Path:
    folder = d / "out"
    (folder / "src").mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    (folder / "src" / "main.py").write_text("print('mine')")
    return folder


def _user_file_inside(d: Path, kind: str) -> Path:
    folder = _marked(d / "out", kind, "manifest.json")
    (folder / "notes.txt").write_text("mine")
    return folder


@pytest.mark.parametrize("prog", ["loc3r-export", "loc3r-convert"])
@pytest.mark.parametrize(
    "make, out, fragments",
    [
        (_foreign_manifest, "out", ["is a folder loc3r did not write (it holds manifest.json); it would be replaced"]),
        (_user_file_inside, "out", ["holds notes.txt, which loc3r did not write; replacing the folder would delete it"]),
        (lambda d, kind: _marked(d / "out", kind, "manifest.json") / "x", ".", ["is the current folder or holds it"]),
        (lambda d, kind: _marked(d / "out", kind, "config.json") / "x", "..", ["is the current folder or holds it"]),
        (lambda d, kind: _marked(d / "out", kind, "manifest.json"), "/", ["is the root folder"]),
    ],
    ids=["foreign-manifest", "user-file-inside", "dot-inside-output", "parent-of-cwd", "root"],
)
def test_an_output_folder_is_only_replaced_when_loc3r_wrote_all_of_it(
    prog: str, make, out: str, fragments: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from loc3r.models import convert_cli

    made = make(tmp_path, "export" if prog == "loc3r-export" else "bundle")
    if made.name == "x":  # run from inside the output folder
        made.mkdir()
        monkeypatch.chdir(made)
    folder = tmp_path / "out"
    before = _tree(folder)
    target = out if out != "out" else folder
    if prog == "loc3r-export":
        result = export(capsys, "--target", "cpu", "--llm", "none", "--out", target)
    else:
        result = cli(convert_cli.main, capsys, "--llava", tmp_path / "nowhere", "--cut3r", tmp_path / "c.pth", "--out", target)
    assert_error(result, 2, *fragments, prog=prog)
    assert _tree(folder) == before


def test_a_bundle_is_never_replaced_by_an_export(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_dir, bundle)
    result = export(capsys, "--target", "cpu", "--llm", "none", "--out", bundle)
    assert_error(result, 2, "holds loc3r output of kind 'bundle', not 'export'", prog="loc3r-export")
    assert (bundle / "config.json").is_file()


def test_atomic_directory_replaces_its_own_folder_and_keeps_later_entries(tmp_path: Path) -> None:
    target = tmp_path / "out"
    for round_ in ("first", "second"):
        with fileio.atomic_directory(target, "export", later=("timing.cache",)) as staging:
            (staging / "manifest.json").write_text(round_)
        (target / "timing.cache").write_text("cache")  # a program adds its cache later
    assert (target / "manifest.json").read_text() == "second"
    marker = fileio.read_marker(target)
    assert (sorted(marker["files"]), marker["later"]) == (["manifest.json"], ["timing.cache"])
    assert marker["files"]["manifest.json"] == {"size": 6, "sha256": hashlib.sha256(b"second").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, nothing set aside


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_run_killed_between_the_two_renames_loses_nothing(tmp_path: Path) -> None:
    """Killed after the old folder was renamed aside but before the new one came in: the
    next run renames the old one back; leftovers of killed runs are removed; a live run's
    staging folder is left alone."""
    target = _marked(tmp_path / "out", "export", "manifest.json")
    dead = _dead_pid()
    staging = tmp_path / f".out.loc3r-{dead}-abc"
    staging.mkdir()
    (staging / "manifest.json").write_text("new, half written")
    target.rename(tmp_path / f".out.loc3r-{dead}-abc.old")  # the moment of the kill
    live = tmp_path / f".out.loc3r-{os.getppid()}-xyz"
    live.mkdir()
    fileio.clean_stale_staging(target)
    assert (target / "manifest.json").read_text() == "manifest.json"  # the old export is back
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]
    stale = tmp_path / f".out.loc3r-{dead}-def.old"  # killed after both renames: the old copy goes
    stale.mkdir()
    fileio.clean_stale_staging(target)
    assert not stale.exists() and (target / "manifest.json").is_file()


def test_signals_wait_for_the_swap(tmp_path: Path) -> None:
    """A SIGTERM that arrives between the two renames is delivered after them."""
    from loc3r.cli_support import Terminated, _terminate

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        done = []
        with pytest.raises(Terminated):
            with fileio.signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append(True)
        assert done == [True]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_export_stopped_by_a_signal_leaves_nothing(sig: int, code: int, word: str, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    process = subprocess.Popen([str(SCRIPTS / "loc3r-export"), "--target", "cpu", "--llm", "none", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".engines.loc3r-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".engines.loc3r-*")), "the export never started writing"
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert err.strip().splitlines()[-1] == f"loc3r-export: {word}" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_plot_never_overwrites_an_input_or_writes_a_non_image(video: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "v.mp4"
    shutil.copy(video, copy)
    assert_error(run(capsys, copy, "Where am I?", "--plot", copy, *FAST), 2, f"--plot {copy} does not end in .png")
    assert_error(run(capsys, copy, "Where am I?", "--plot", tmp_path / "notes.txt", *FAST), 2, "does not end in .png")
    named_png = tmp_path / "map_2.png"  # a video whose name the second plot would take
    shutil.copy(video, named_png)
    result = run(capsys, named_png, "first?", "second?", "--plot", tmp_path / "map.png", *FAST)
    assert_error(result, 2, f"--plot {named_png} is an input ({named_png}); it would be overwritten")
    assert named_png.read_bytes() == video.read_bytes() and copy.read_bytes() == video.read_bytes()


def test_every_output_is_written_with_the_umask(cpu_export: Path, tiny_dir: Path, video: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Exports (llm/embeddings.safetensors included), bundles, plots and cache entries are
    readable by others as the umask allows (libraries that write 0600 are corrected)."""
    mask = fileio.current_umask()
    monkeypatch.setenv("LOC3R_HOME", str(tmp_path / "home"))
    ok_json(run(capsys, video, "Where am I?", "--json", "--plot", tmp_path / "map.png", "--frames", "2", "--max-new-tokens", "2"))
    outputs = [*cpu_export.rglob("*"), *tiny_dir.rglob("*"), tmp_path / "map.png", *(tmp_path / "home" / "cache").rglob("*")]
    assert cpu_export / "llm" / "embeddings.safetensors" in outputs and len(outputs) > 12
    for path in outputs:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# --- 3. every artifact is verified; nothing silently wrong -------------------------------------


def link_copy(source: Path, target: Path) -> Path:
    """A copy of an export whose files are hard links (cheap); damage replaces, never edits."""
    shutil.copytree(source, target, copy_function=os.link)
    return target


def replace_bytes(path: Path, data: bytes) -> None:
    path.unlink()  # break the hard link first
    path.write_bytes(data)


def edit_manifest(edit):  # noqa: ANN001, ANN201
    def damage(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(manifest)
        replace_bytes(folder / "manifest.json", json.dumps(manifest).encode())

    return damage


def _flip(folder: Path) -> None:
    data = bytearray((folder / "vision.onnx").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    replace_bytes(folder / "vision.onnx", bytes(data))


def _flip_in(relative: str):  # noqa: ANN202
    """Damage: 4 KiB of ``relative`` inverted, its size kept."""

    def damage(folder: Path) -> None:
        data = bytearray((folder / relative).read_bytes())
        middle = len(data) // 2
        data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
        replace_bytes(folder / relative, bytes(data))

    return damage


def _swap(folder: Path) -> None:
    pose, bev = (folder / "pose_head.onnx").read_bytes(), (folder / "bev_head.onnx").read_bytes()
    replace_bytes(folder / "pose_head.onnx", bev)
    replace_bytes(folder / "bev_head.onnx", pose)


def _escape_by_symlink(folder: Path) -> None:
    outside = folder.parent / "outside.onnx"
    outside.write_bytes((folder / "vision.onnx").read_bytes())
    (folder / "vision.onnx").unlink()
    (folder / "vision.onnx").symlink_to(outside)


def _set(*keys: str, value: object):  # noqa: ANN202
    def edit(manifest: dict) -> None:
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        if value is KeyError:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return edit_manifest(edit)


MANIFEST_DAMAGE = {
    "flipped-4KiB": (_flip, "vision.onnx does not match the sha256 in its manifest (damaged or replaced)"),
    # the weights: external data of a graph and of the LLM decoder (same size, other bytes)
    "flipped-graph-data": (_flip_in("vision.onnx.data"), "vision.onnx.data does not match the sha256 in its manifest"),
    "flipped-llm-data": (_flip_in("llm/decoder.onnx.data"), "decoder.onnx.data does not match the sha256 in its manifest"),
    "truncated-external-data": (
        lambda f: replace_bytes(f / "llm/decoder.onnx.data", (f / "llm/decoder.onnx.data").read_bytes()[:1000]),
        "decoder.onnx.data has 1000 bytes, its manifest says",
    ),
    "missing": (lambda f: (f / "vision.onnx").unlink(), "lacks vision.onnx, which its manifest lists"),
    "renamed": (lambda f: (f / "cut3r_init.safetensors").rename(f / "init.safetensors"), "lacks cut3r_init.safetensors"),
    "swapped": (_swap, "bev_head.onnx has "),  # the sizes differ, so the size check speaks first
    "symlink-out": (_escape_by_symlink, "names 'vision.onnx', which is outside its folder"),
    "dot-dot": (_set("artifacts", "vision", "file", value="../elsewhere/vision.onnx"), "which is outside its folder"),
    "absolute": (_set("artifacts", "vision", "file", value="/etc/passwd"), "names '/etc/passwd', which is outside its folder"),
    "empty-name": (_set("artifacts", "vision", "file", value=""), "a file name is empty or not text"),
    "unlisted": (_set("files", "vision.onnx", value=KeyError), "refers to 'vision.onnx', which its 'files' section does not list"),
    "no-files": (_set("files", value=KeyError), "lacks the 'files' section"),
    "bad-digest": (_set("files", "vision.onnx", "sha256", value="xyz"), "the size or sha256 of 'vision.onnx' is malformed"),
    "no-cut3r-input": (_set("cut3r_input", value=KeyError), "was exported for one fixed CUT3R size"),
    "cut3r-input-strings": (_set("cut3r_input", "patch", value="16"), "is not {long_side, min_short_side, patch} in pixels"),
    "no-cut3r-artifact": (_set("artifacts", "cut3r_step", value=KeyError), "has no 'cut3r_step' artifact"),
    "no-initial-state": (_set("artifacts", "cut3r_step", "initial_state", value=KeyError), "'artifacts.cut3r_step.initial_state' is missing"),
    "no-decoder": (_set("llm", "decoder", value=KeyError), "'llm.decoder.file' is missing or malformed"),
    "no-llm-format": (_set("llm", "quantization", value=KeyError), "'llm.quantization.layers' is missing or malformed"),
    "no-outputs": (_set("artifacts", "vision", "outputs", value=[]), "artifact 'vision' is malformed"),
    "bool-size": (_set("files", "vision.onnx", "size", value=True), "the size or sha256 of 'vision.onnx' is malformed"),
    "old-version": (_set("version", value=1), "has manifest version 1, this loc3r reads 2"),
}


@pytest.mark.parametrize("case", list(MANIFEST_DAMAGE))
def test_a_damaged_export_is_refused_in_one_line(case: str, cpu_export: Path, video: Path, tmp_path: Path, capsys) -> None:
    """Mutation checked: ``Manifest.verify`` ignoring a sha256 mismatch on ``.data`` files
    (the weights) makes the ``flipped-graph-data`` and ``flipped-llm-data`` cases fail."""
    damage, fragment = MANIFEST_DAMAGE[case]
    engines = link_copy(cpu_export, tmp_path / "engines")
    damage(engines)
    result = run(capsys, video, "Where am I?", "--backend", "onnxruntime", "--engines", engines, "--json", *FAST)
    assert_error(result, 2, fragment)


@pytest.mark.parametrize("graph", ["../../outside", "ghost", "vision/../../x"])
def test_engines_are_never_written_outside_the_export(graph: str, cpu_export: Path, tmp_path: Path, capsys) -> None:
    engines = link_copy(cpu_export, tmp_path / "engines")
    plan = {"sm": "87", "trt_version": "10.3", "precision": "fp16", "workspace_mib": 1024, "engines": {graph: {"profiles": [{}]}}}
    edit_manifest(lambda m: m.update(device_build=plan))(engines)
    result = export(capsys, "build", "--manifest", engines / "manifest.json")  # refused before TensorRT is imported
    assert_error(result, 2, f"plans an engine for {graph!r}, which is not one of its graphs", prog="loc3r-export build")


def test_verification_is_memoised_and_still_catches_damage(cpu_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file is hashed once while it is unchanged, and verified before every run all the
    same: a weights file (``.data``) damaged in place, its size and mtime put back, is refused.

    Mutations checked: ``Manifest.verify`` ignoring a sha256 mismatch on ``.data`` files, or
    a memo keyed on size and mtime alone (the damage is then not seen): either makes the
    last step fail."""
    from loc3r import digest
    from loc3r.export.manifest import load_manifest

    monkeypatch.setenv("LOC3R_HOME", str(tmp_path / "home"))  # an empty memo
    engines = link_copy(cpu_export, tmp_path / "engines")
    hashed: list[Path] = []
    real = digest.file_sha256
    monkeypatch.setattr(digest, "file_sha256", lambda path: hashed.append(path) or real(path))
    manifest = load_manifest(engines)
    manifest.verify()
    assert {p.relative_to(engines).as_posix() for p in hashed} == set(manifest.files) and "llm/decoder.onnx.data" in manifest.files
    hashed.clear()
    load_manifest(engines).verify()
    assert hashed == []  # remembered
    replace_bytes(engines / "bev_head.onnx", (engines / "bev_head.onnx").read_bytes())  # same bytes, new mtime
    load_manifest(engines).verify()
    assert hashed == [engines / "bev_head.onnx"]
    weights = engines / "llm/decoder.onnx.data"
    replace_bytes(weights, weights.read_bytes())  # its own inode: the edit below must not reach the fixture
    load_manifest(engines).verify()  # remembered with this stat
    before = weights.stat()
    time.sleep(0.05)  # past the kernel's coarse clock tick
    with weights.open("r+b") as stream:  # damaged in place
        stream.seek(before.st_size // 2)
        chunk = stream.read(4096)
        stream.seek(before.st_size // 2)
        stream.write(bytes(b ^ 0xFF for b in chunk))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as they were
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    with pytest.raises(ModelError, match="decoder.onnx.data does not match the sha256 in its manifest"):
        load_manifest(engines).verify()


def test_the_encoding_cache_is_keyed_on_the_artifacts(cpu_export: Path, video: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Two exports of the same model that compute different things never share an entry."""
    from safetensors.torch import load_file, save_file

    from loc3r.export.manifest import load_manifest, write_manifest

    monkeypatch.setenv("LOC3R_HOME", str(tmp_path / "home"))
    other = link_copy(cpu_export, tmp_path / "other")
    init = {k: v * 1.5 for k, v in load_file(str(other / "cut3r_init.safetensors")).items()}
    (other / "cut3r_init.safetensors").unlink()
    save_file(init, str(other / "cut3r_init.safetensors"))
    manifest = load_manifest(other)
    write_manifest(other, {**manifest.data, "files": {k: v for k, v in manifest.files.items() if k != "cut3r_init.safetensors"}})
    argv = ["Where am I?", "--backend", "onnxruntime", "--json", "--frames", "2", "--max-new-tokens", "2"]
    first = ok_json(run(capsys, video, *argv, "--engines", cpu_export))
    second = ok_json(run(capsys, video, *argv, "--engines", other))
    again = ok_json(run(capsys, video, *argv, "--engines", cpu_export))
    assert (first["video"]["encoding_cache"], second["video"]["encoding_cache"], again["video"]["encoding_cache"]) == ("stored", "stored", "hit")
    assert second["position"] != first["position"] and again["position"] == first["position"]


def test_a_non_finite_pose_is_null_in_json_and_warned(video: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    from loc3r.runtime import torch_backend

    real = torch_backend.TorchHeads.pose

    def nan_pose(self, pos_state, ori_state):  # noqa: ANN001, ANN202
        xy, sigma, theta = real(self, pos_state, ori_state)
        return xy * float("nan"), sigma, theta * float("inf")

    monkeypatch.setattr(torch_backend.TorchHeads, "pose", nan_pose)
    result = run(capsys, video, "Where am I?", "--json", *FAST)
    assert result.code == 0 and result.err.splitlines() == [
        "loc3r-run: warning: the model gave a non-finite pose (JSON shows null): its weights or engines may be damaged"]
    out = json.loads(result.out.splitlines()[-1], parse_constant=lambda name: pytest.fail(f"bare {name} in the JSON"))
    assert out["position"]["x"] is None and out["orientation"]["theta_rad"] is None and out["position"]["sigma"] is not None
    assert torch.isfinite(torch.tensor(out["position"]["sigma"]))


# --- bundle configs -------------------------------------------------------------------------


def _config(section: str | None, field: str, value: object):  # noqa: ANN202
    def edit(config: dict) -> None:
        (config[section] if section else config)[field] = value

    return edit


CONFIG_DAMAGE = {
    "hidden-1e9": (_config("llm", "hidden_size", 10**9), "llm.hidden_size is 1000000000, expected an integer from 1 to 65536"),
    "vocab-1e12": (_config("llm", "vocab_size", 10**12), "llm.vocab_size is 1000000000000, expected an integer from 1 to 2097152"),
    "zero-heads": (_config("vision", "num_attention_heads", 0), "vision.num_attention_heads is 0"),
    "negative-kv-heads": (_config("llm", "num_key_value_heads", -2), "llm.num_key_value_heads is -2"),
    "kv-heads-not-dividing": (_config("llm", "num_key_value_heads", 3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    "string-for-int": (_config("cut3r", "enc_depth", "2"), "cut3r.enc_depth is '2', expected an integer from 1 to 256"),
    "float-for-int": (_config("llm", "num_hidden_layers", 2.0), "llm.num_hidden_layers is 2.0"),
    "cut3r-zero-heads": (_config("cut3r", "enc_num_heads", 0), "cut3r.enc_num_heads is 0"),
    "cut3r-img-size": (_config("cut3r", "img_size", [512, "x"]), "cut3r.img_size is (512, 'x'), expected a pair of integers"),
    "nan-rope": (_config("llm", "rope_theta", float("nan")), "llm.rope_theta is nan, expected a number above 0"),
    "inf-eps": (_config("llm", "rms_norm_eps", float("inf")), "llm.rms_norm_eps is inf"),
    "negative-eps": (_config("vision", "layer_norm_eps", -1.0), "vision.layer_norm_eps is -1.0"),
    "huge-context": (_config("llm", "max_position_embeddings", 10**9), "llm.max_position_embeddings is 1000000000"),
    "tiny-image": (_config("vision", "image_size", 5), "do not fit a 5-pixel image"),
    "unknown-activation": (_config("llm", "hidden_act", "os.system"), "llm.hidden_act 'os.system' is not an activation"),
    "pool-stride": (_config(None, "spatial_pool_stride", 99), "spatial_pool_stride is 99"),
    "select-layer": (_config(None, "vision_select_layer", -40), "vision_select_layer -40 does not select a layer"),
    "frames": (_config(None, "num_frames", 10**9), "num_frames is 1000000000"),
    "cut3r-not-object": (_config(None, "cut3r", [1]), "config.json: cut3r is [1], expected an object"),
    "token-ids-beyond-rows": (_config("llm", "vocab_size", 10), "tokenizer.json has token id 511 but the LLM's embedding has only 10 rows"),
}


@pytest.mark.parametrize("case", list(CONFIG_DAMAGE))
def test_a_hostile_config_is_refused_before_allocating(case: str, tiny_dir: Path, video: Path, tmp_path: Path, capsys) -> None:
    edit, fragment = CONFIG_DAMAGE[case]
    bundle = link_copy(tiny_dir, tmp_path / "bundle")
    config = json.loads((bundle / "config.json").read_text())
    edit(config)
    replace_bytes(bundle / "config.json", json.dumps(config).encode())
    assert_error(run(capsys, video, "Where am I?", "--model", bundle, "--json", *FAST), 2, fragment)


# --- sampling, limits, video and live sources ---------------------------------------------------------


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--temperature", "nan"], "--temperature nan is out of range: use 0 (greedy) or a number from 0.01 to 100"),
        (["--temperature", "-1"], "--temperature -1.0 is out of range"),
        (["--temperature", "1e-40"], "--temperature 1e-40 is out of range"),
        (["--temperature", "inf"], "--temperature inf is out of range"),
        (["--top-p", "0"], "--top-p 0.0 is out of range"),
        (["--top-p", "nan"], "--top-p nan is out of range"),
        (["--seed", str(2**64)], f"--seed {2**64} is out of range: use a whole number from 0 to {2**64 - 1}"),
        (["--seed", "-1"], "--seed -1 is out of range"),
        (["--max-new-tokens", "100000"], "--max-new-tokens 100000 does not fit"),
        (["--frame-size", "100000x100000", "--source", "-"], "argument --frame-size: 100000x100000 is larger than loc3r reads"),
    ],
    ids=["temp-nan", "temp-negative", "temp-tiny", "temp-inf", "top-p-0", "top-p-nan", "seed-65-bits", "seed-negative",
         "max-new-tokens", "frame-size"],
)
def test_bad_sampling_and_limits(argv: list[str], fragment: str, video: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    result = run(capsys, video, "Where am I?", "--frames", "2", "--no-cache", *argv)
    line = assert_error(result, 2, fragment)
    if "--max-new-tokens" in argv:  # the advice is exact: the session's own check at ask time accepts it
        room = int(line.rsplit("--max-new-tokens ", 1)[1])
        monkeypatch.setattr(session_module, "generate", lambda *args, **kwargs: [])  # the random model never stops
        ok_json(run(capsys, video, "Where am I?", "--frames", "2", "--no-cache", "--json", "--max-new-tokens", str(room)))
        assert_error(run(capsys, video, "Where am I?", "--frames", "2", "--no-cache", "--max-new-tokens", str(room + 1)), 2,
                     "use at most 1 frames (--frames 1) or a lower --max-new-tokens")


def test_the_frames_advice_is_the_real_maximum(tiny_dir: Path, video: Path, tmp_path: Path, capsys) -> None:
    bundle = link_copy(tiny_dir, tmp_path / "bundle")
    config = json.loads((bundle / "config.json").read_text())
    config["llm"]["max_position_embeddings"] = 2048
    replace_bytes(bundle / "config.json", json.dumps(config).encode())
    argv = ["Where am I?", "--model", bundle, "--json", "--no-cache", "--max-new-tokens", "40"]
    line = assert_error(run(capsys, video, *argv, "--frames", "20"), 2, "the LLM's context limit is 2048 tokens", "or a lower --max-new-tokens")
    most = int(line.split("(--frames ")[1].split(")")[0])
    ok_json(run(capsys, video, *argv, "--frames", str(most)))
    assert_error(run(capsys, video, *argv, "--frames", str(most + 1)), 2, f"use at most {most} frames")


def test_long_generation_is_refused_naming_the_flag_at_ask_time(video: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from loc3r.runtime import cli as run_module

    monkeypatch.setattr(run_module, "check_fit", lambda *args, **kwargs: None)  # only the session's own check is left
    assert_error(run(capsys, video, "Where am I?", "--frames", "2", "--no-cache", "--max-new-tokens", "16000"), 2,
                 "and --max-new-tokens asks for 16000 more, but the LLM's context limit is 16384", "use at most --max-new-tokens")


def _extreme_video(path: Path, width: int, height: int) -> Path:
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 120, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: _extreme_video(d / "wide.mp4", 8000, 10), "frame is too narrow for 16-pixel patches"),
        (lambda d: _extreme_video(d / "tall.mp4", 10, 8000), "frame is too narrow for 16-pixel patches"),
        (lambda d: Path("/dev/zero"), "/dev/zero: is a device, not a video file"),
        (lambda d: (os.mkfifo(d / "pipe.mp4"), d / "pipe.mp4")[1], "pipe.mp4: is a FIFO, not a video file"),
    ],
    ids=["8000x10", "10x8000", "dev-zero", "fifo"],
)
def test_extreme_and_special_files(make, fragment: str, tmp_path: Path, capsys) -> None:
    assert_error(run(capsys, make(tmp_path), "Where am I?", *FAST), 2, fragment)


@pytest.mark.parametrize("interactive", [False, True])
def test_an_audio_only_live_source_is_one_line(interactive: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The source is opened before any question is read, so even with -i the error is the
    run's one line (never a traceback from the reader thread, never exit 0)."""
    import io

    from media import write_audio_only

    source = write_audio_only(tmp_path / "radio.m4a")
    monkeypatch.setattr("sys.stdin", io.StringIO("Where am I?\n"))
    result = run(capsys, "--source", source, "-i" if interactive else "Where am I?", "--frames", "2", "--max-new-tokens", "2", "--no-cache")
    assert_error(result, 2, f"{source}: has only audio, no video stream: pass a video file (mp4, mkv, mov, webm, avi)")


def test_a_closed_stdout_is_not_an_error(video: Path) -> None:
    """``loc3r-run ... | head -c 5``: the reader goes away; no BrokenPipeError, no traceback."""
    process = subprocess.Popen([str(SCRIPTS / "loc3r-run"), str(video), "Where am I?", "What is here?", *FAST],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(process.stdout.read(5)) == 5
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) in (0, 141)
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err


# --- encoding-cache faults never stop an answer ----------------------------------------------------


def _entry(home: Path) -> Path:
    (entry,) = (home / "cache" / "encodings").glob("*.safetensors")
    return entry


def _rewrite_entry(entry: Path, edit) -> None:  # noqa: ANN001
    """Re-save the entry with its description edited and a checksum that matches again."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from loc3r.runtime.encoding_cache import entry_digest

    with safe_open(str(entry), "pt") as stored:
        description, blocks = json.loads(stored.metadata()["entry"]), stored.get_tensor("blocks")
    edit(description)
    text = json.dumps(description)
    save_file({"blocks": blocks}, str(entry), metadata={"entry": text, "sha256": entry_digest(blocks, text)})


def _huge_header(entry: Path) -> None:
    entry.write_bytes((2**62).to_bytes(8, "little") + entry.read_bytes()[8:])


def _directory(entry: Path) -> None:
    entry.unlink()
    entry.mkdir()


CACHE_FAULTS = {
    "huge-header-length": (_huge_header, "is corrupt ("),
    "directory-as-entry": (_directory, "is corrupt (not a file)"),
    "truncated": (lambda e: e.write_bytes(e.read_bytes()[:200]), "is corrupt ("),
    "fewer-indices-than-blocks": (lambda e: _rewrite_entry(e, lambda d: d["indices"].pop()), "do not describe its 2 blocks"),
    "timestamp-nan": (lambda e: _rewrite_entry(e, lambda d: d["timestamps_s"].__setitem__(0, float("nan"))), "not a finite number"),
    "index-string": (lambda e: _rewrite_entry(e, lambda d: d["indices"].__setitem__(0, "0")), "not a whole number"),
    "entry-of-another-key": (lambda e: _rewrite_entry(e, lambda d: d.update(key="0" * 40)), "belongs to another key"),
}


@pytest.mark.parametrize("case", list(CACHE_FAULTS))
def test_a_bad_cache_entry_is_discarded_and_the_answer_comes(case: str, video: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    damage, fragment = CACHE_FAULTS[case]
    monkeypatch.setenv("LOC3R_HOME", str(tmp_path / "home"))
    argv = [video, "Where am I?", "--json", "--frames", "2", "--max-new-tokens", "2"]
    first = ok_json(run(capsys, *argv))
    damage(_entry(tmp_path / "home"))
    result = run(capsys, *argv)
    again = ok_json(result)
    (warning, *more) = result.err.splitlines()
    assert warning.startswith("loc3r-run: warning: encoding cache entry ") and fragment in warning and not more[1:], result.err
    assert again["answer_token_ids"] == first["answer_token_ids"] and again["position"] == first["position"]


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(28, "No space left on device"),
                                   IsADirectoryError(21, "Is a directory")], ids=["read-only", "disk-full", "is-a-directory"])
def test_a_cache_that_cannot_be_written_is_reported_once(error: OSError, video: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from loc3r.runtime import encoding_cache

    def refuse(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setenv("LOC3R_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(encoding_cache, "atomic_file", refuse)
    result = run(capsys, video, "first?", "--json", "--frames", "2", "--max-new-tokens", "2")
    answer = ok_json(result)
    assert result.err.splitlines() == [f"loc3r-run: warning: cannot write the encoding cache in {tmp_path / 'home' / 'cache' / 'encodings'} "
                                       f"({error.strerror}): going on without it"]
    assert "encoding_cache" not in answer["video"]


# --- evaluation data -------------------------------------------------------------------------------


EVAL_DATA = {
    "nul-in-path": ('{"video": "v\\u0000.mp4", "question": "q"}', "line 1: field 'video' must be a video file path"),
    "400-digit-number": ('{"video": "v.mp4", "question": "q", "orientation": ' + "9" * 400 + "}", "field 'orientation' must be a number"),
    "400-digit-answer": ('{"video": "v.mp4", "question": "q", "answer": -' + "9" * 400 + "}", "field 'answer' must be text"),
    "deep-meta": ('{"video": "v.mp4", "question": "q", "meta": ' + "[" * 100000 + "]" * 100000 + "}", "line 1: nested too deeply"),
    "lone-surrogate-question": ('{"video": "v.mp4", "question": "q\\ud800"}', "holds a lone surrogate ('\\ud800'), which is not text"),
    "lone-surrogate-meta": ('{"video": "v.mp4", "question": "q", "meta": {"\\udfff": 1}}', "holds a lone surrogate"),
}


@pytest.mark.parametrize("case", list(EVAL_DATA))
def test_bad_eval_data_is_one_line(case: str, video: Path, tmp_path: Path, capsys) -> None:
    from loc3r.eval import cli as eval_cli

    line, fragment = EVAL_DATA[case]
    shutil.copy(video, tmp_path / "v.mp4")
    (tmp_path / "data.jsonl").write_text(line + "\n")
    result = cli(eval_cli.main, capsys, tmp_path / "data.jsonl", "--out", tmp_path / "out", "--frames", "2")
    assert_error(result, 2, fragment, prog="loc3r-eval")


RESUME_DAMAGE = {
    "pose-empty": {"key": "a", "question": "q", "video": "v.mp4", "answer": "", "pose": {}},
    "key-a-list": {"key": ["a"], "question": "q", "video": "v.mp4", "answer": "", "pose": {"x": 0, "y": 0, "sigma": 1, "theta_rad": 0}},
    "pose-strings": {"key": "a", "question": "q", "video": "v.mp4", "answer": "", "pose": {"x": "0", "y": 0, "sigma": 1, "theta_rad": 0}},
    "answer-number": {"key": "a", "question": "q", "video": "v.mp4", "answer": 3, "pose": {"x": 0, "y": 0, "sigma": 1, "theta_rad": 0}},
}


@pytest.mark.parametrize("case", list(RESUME_DAMAGE))
def test_a_malformed_resume_file_is_one_line(case: str, video: Path, tmp_path: Path, capsys) -> None:
    from loc3r.eval import cli as eval_cli

    shutil.copy(video, tmp_path / "v.mp4")
    (tmp_path / "data.jsonl").write_text('{"id": "a", "video": "v.mp4", "question": "q", "position": {"x": 0, "y": 0}}\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictions.jsonl").write_text(json.dumps(RESUME_DAMAGE[case]) + "\n")
    result = cli(eval_cli.main, capsys, tmp_path / "data.jsonl", "--out", tmp_path / "out", "--frames", "2")
    assert_error(result, 2, "is a folder loc3r did not write (it holds predictions.jsonl)", prog="loc3r-eval")


@pytest.mark.parametrize("value", ["high", [0.5], {"v": 1}, True, 10**400])
def test_compare_refuses_metrics_that_are_not_numbers(value: object, tmp_path: Path, capsys) -> None:
    from loc3r.eval import cli as eval_cli

    (tmp_path / "a.json").write_text(json.dumps({"metrics": {"em": 0.5}}))
    (tmp_path / "b.json").write_text(json.dumps({"metrics": {"em": value}}))
    result = cli(eval_cli.main, capsys, "--compare", tmp_path / "a.json", tmp_path / "b.json")
    assert_error(result, 2, "b.json: metric 'em' is ", "not a number", prog="loc3r-eval")


def test_eval_out_that_is_a_file_is_one_line(video: Path, tmp_path: Path, capsys) -> None:
    from loc3r.eval import cli as eval_cli

    shutil.copy(video, tmp_path / "v.mp4")
    (tmp_path / "data.jsonl").write_text('{"video": "v.mp4", "question": "q"}\n')
    (tmp_path / "out").write_text("mine")
    result = cli(eval_cli.main, capsys, tmp_path / "data.jsonl", "--out", tmp_path / "out")
    assert_error(result, 2, "is a file, not a folder", prog="loc3r-eval")
    assert (tmp_path / "out").read_text() == "mine"
