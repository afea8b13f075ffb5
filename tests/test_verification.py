"""Issue 23, class 5: verification that cannot be bypassed.

An export or bundle is hostile input: the digests that vouch for its files are kept in the
user's cache keyed on file identity (never in a memo the folder carries), every ONNX
external-data reference is checked against the manifest before ONNX Runtime opens a graph,
tensors' dtypes are checked as well as their shapes, and sizes that the manifest states are
bounded before anything is allocated.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_bad_input import FAST, assert_error, run

from loc3r.digest import DigestMemo
from loc3r.export.manifest import load_manifest
from loc3r.models.bundle import bundle_checksum
from loc3r.models.tiny import ensure_tiny_bundle
from loc3r.runtime.demo_video import write_demo_video


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("media") / "demo.mp4", num_frames=8, width=64, height=48)


@pytest.fixture
def engines(cpu_export: Path, tmp_path: Path) -> Path:
    """A private copy of the export (real copies: damage may edit files in place)."""
    return Path(shutil.copytree(cpu_export, tmp_path / "engines"))


def flip_in_place(path: Path, offset: int) -> None:
    """Flip one byte of ``path`` in place (same inode), then put back its size and mtime."""
    before = path.stat()
    with path.open("r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def onnx_run(capsys, video: Path, engines: Path):  # noqa: ANN001, ANN201
    return run(capsys, video, "Where am I?", "--backend", "onnxruntime", "--engines", engines, "--json", *FAST)


# -- the digest memo -------------------------------------------------------------------------

FLIPS = {  # file -> where in it a byte is flipped
    "vision.onnx": 0.5,
    "llm/decoder.onnx.data": 0.3,
    "cut3r_init.safetensors": 0.9,
    "pose_head.onnx": 0.99,
}


@pytest.mark.parametrize("relative", list(FLIPS))
def test_a_flipped_byte_with_size_and_mtime_restored_is_caught(relative: str, engines: Path, video: Path, capsys) -> None:
    load_manifest(engines).verify()  # every digest is now remembered
    path = engines / relative
    flip_in_place(path, int(path.stat().st_size * FLIPS[relative]))
    result = onnx_run(capsys, video, engines)
    assert_error(result, 2, f"{relative.split('/')[-1]} does not match the sha256 in its manifest")


@pytest.mark.parametrize("memo_name", [".loc3r-digests.json", ".loc3r-checksum.json"])
def test_a_memo_inside_the_export_is_not_trusted(memo_name: str, engines: Path, video: Path, capsys) -> None:
    """A forged memo claiming the listed digest for every file (with the files' current
    size and mtime, in the format older versions read) changes nothing."""
    manifest = load_manifest(engines)
    flip_in_place(engines / "vision.onnx", 100)
    forged = {name: [(engines / name).stat().st_size, (engines / name).stat().st_mtime_ns, entry["sha256"]]
              for name, entry in manifest.files.items()}
    (engines / memo_name).write_text(json.dumps(forged))
    assert_error(onnx_run(capsys, video, engines), 2, "vision.onnx does not match the sha256 in its manifest")


def test_digests_are_remembered_in_the_users_cache_only(engines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loc3r import digest

    monkeypatch.setenv("LOC3R_HOME", str(tmp_path / "home"))
    before = sorted(p.name for p in engines.rglob("*"))
    hashed: list[Path] = []
    real = digest.file_sha256
    monkeypatch.setattr(digest, "file_sha256", lambda path: hashed.append(path) or real(path))
    load_manifest(engines).verify()
    assert len(hashed) == len(load_manifest(engines).files)
    hashed.clear()
    load_manifest(engines).verify()
    assert hashed == []  # remembered ...
    assert sorted(p.name for p in engines.rglob("*")) == before  # ... and not in the export
    assert (tmp_path / "home" / "cache" / digest.MEMO_FILE).is_file()


def test_a_bundle_checksum_memo_in_the_bundle_is_not_trusted(tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(ensure_tiny_bundle(), tmp_path / "bundle"))
    genuine = bundle_checksum(bundle)
    files = ["config.json", "tokenizer.json", "model.safetensors"]
    stamp = [[name, (bundle / name).stat().st_size, (bundle / name).stat().st_mtime_ns] for name in files]
    flip_in_place(bundle / "model.safetensors", (bundle / "model.safetensors").stat().st_size - 10)
    (bundle / ".loc3r-checksum.json").write_text(json.dumps({"files": stamp, "sha256": genuine}))
    assert bundle_checksum(bundle) != genuine


def test_a_memo_entry_is_not_kept_when_the_file_changed_while_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)
    memo = DigestMemo(tmp_path / "memo.json")

    def rewriting() -> str:
        path.write_bytes(b"b" * 1000)
        return "stale"

    assert memo.remember([path], "sha256", rewriting) == "stale"
    memo.save()
    assert DigestMemo(tmp_path / "memo.json").sha256(path) != "stale"


# -- ONNX external data ----------------------------------------------------------------------


def _point_external_data(engines: Path, location: str, unlisted: str | None = None) -> None:
    """Re-save pose_head.onnx with its weights in ``data.bin`` beside it, then point every
    reference at ``location``; the manifest is re-written to vouch for the new graph (the
    export's author controls both)."""
    import onnx

    from loc3r.export.manifest import write_manifest

    graph = engines / "pose_head.onnx"
    model = onnx.load(str(graph))
    (engines / "data.bin").unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True, location="data.bin", size_threshold=1024)
    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(graph))
    data = load_manifest(engines).data
    listed = {name: entry for name, entry in data["files"].items() if name != "pose_head.onnx"}
    manifest = write_manifest(engines, {**data, "files": listed})  # lists pose_head.onnx and data.bin anew
    if unlisted:  # a file the manifest does not vouch for
        files = {name: entry for name, entry in manifest.files.items() if name != unlisted}
        (engines / "manifest.json").write_text(json.dumps({**manifest.data, "files": files}))


def _outside(engines: Path) -> str:
    shutil.copyfile(engines / "data.bin", engines.parent / "outside.bin")
    return "../outside.bin"


def _absolute(engines: Path) -> str:
    shutil.copyfile(engines / "data.bin", engines.parent / "outside.bin")
    return str(engines.parent / "outside.bin")


def _symlink_out(engines: Path) -> str:
    shutil.copyfile(engines / "data.bin", engines.parent / "outside.bin")
    (engines / "link.bin").symlink_to(engines.parent / "outside.bin")
    return "link.bin"


def _unlisted(engines: Path) -> str:
    shutil.copyfile(engines / "data.bin", engines / "unlisted.bin")
    return "unlisted.bin"


def _past_the_end(engines: Path) -> str:
    (engines / "data.bin").write_bytes((engines / "data.bin").read_bytes()[:16])
    return "data.bin"


EXTERNAL_DATA = {  # case -> (prepare the target and return the location, message fragment)
    "dot-dot": (_outside, "takes its data from '../outside.bin', which is not a plain path inside the export"),
    "absolute": (_absolute, "which is not a plain path inside the export"),
    "symlink-out": (_symlink_out, "takes its data from 'link.bin', which leads outside the export (a symlink out)"),
    "unlisted-inside": (_unlisted, "takes its data from 'unlisted.bin', which the export's manifest does not list"),
    "past-the-end": (_past_the_end, "beyond its 16 bytes"),
}


@pytest.mark.parametrize("case", list(EXTERNAL_DATA))
def test_external_data_is_checked_against_the_manifest_before_onnxruntime(case: str, engines: Path, video: Path,
                                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    prepare, fragment = EXTERNAL_DATA[case]
    _point_external_data(engines, "data.bin")
    assert load_manifest(engines).verify() is None  # the re-saved export itself is sound
    if case == "past-the-end":
        prepare(engines)
        from loc3r.export.manifest import write_manifest

        data = load_manifest(engines).data
        write_manifest(engines, {**data, "files": {k: v for k, v in data["files"].items() if k != "data.bin"}})
    else:
        location = prepare(engines)
        _point_external_data(engines, location, unlisted=location if case == "unlisted-inside" else None)
    opened: list[str] = []
    import onnxruntime

    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    assert_error(onnx_run(capsys, video, engines), 2, "pose_head.onnx: tensor", fragment)
    assert opened == []  # refused before any graph was opened


# -- dtypes ----------------------------------------------------------------------------------


def relabel(path: Path, to: str = "I32", which: int = 0) -> str:
    """Relabel the ``which``-th F32 tensor of a safetensors file as ``to`` (a 4-byte type: the
    header keeps its length and the offsets stay valid); return its name."""
    import struct

    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = [n for n, h in header.items() if n != "__metadata__" and h["dtype"] == "F32"][which]
    header[name]["dtype"] = to
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(text) == length
    path.unlink()  # never edit a hard-linked or shared file in place
    path.write_bytes(bytes(data[:8]) + text + bytes(data[8 + length :]))
    return name


@pytest.mark.parametrize("which", [0, -1])
def test_a_bundle_tensor_relabelled_as_integers_is_refused(which: int, tmp_path: Path, video: Path, capsys) -> None:
    bundle = Path(shutil.copytree(ensure_tiny_bundle(), tmp_path / "bundle"))
    name = relabel(bundle / "model.safetensors", "I32", which)
    result = run(capsys, video, "Where am I?", "--model", bundle, "--json", *FAST)
    assert_error(result, 2, "has 1 tensors of the wrong type", f"{name} (I32, the model needs floating point)")


@pytest.mark.parametrize("relative", ["cut3r_init.safetensors", "video_end.safetensors"])
def test_an_export_tensor_relabelled_as_integers_is_refused(relative: str, engines: Path, video: Path, capsys) -> None:
    """The export's author can re-write the manifest too: the digests match, the dtype does not."""
    from loc3r.export.manifest import write_manifest

    name = relabel(engines / relative)
    manifest = load_manifest(engines)
    write_manifest(engines, {**manifest.data, "files": {k: v for k, v in manifest.files.items() if k != relative}})
    assert_error(onnx_run(capsys, video, engines), 2, f"{relative} stores {name!r} as int32, not floating point")


# -- sizes the manifest states ---------------------------------------------------------------


def _set_context(engines: Path, tokens: int, planned: int | None = None) -> None:
    data = json.loads((engines / "manifest.json").read_text())
    data["llm"]["context_tokens"] = tokens
    if planned is not None:
        data["memory_plan"]["context_tokens"] = planned
    (engines / "manifest.json").write_text(json.dumps(data))


def test_the_context_is_bounded_by_the_models_positions(engines: Path, video: Path, capsys) -> None:
    from loc3r.models.bundle import load_bundle

    positions = load_bundle(ensure_tiny_bundle()).config.llm.max_position_embeddings
    _set_context(engines, 10**9, planned=10**9)
    assert_error(onnx_run(capsys, video, engines), 2, f"'llm.context_tokens' is 1000000000, beyond the model's {positions} positions")


def test_the_context_is_bounded_by_the_memory_plan(engines: Path, video: Path, capsys) -> None:
    planned = json.loads((engines / "manifest.json").read_text())["memory_plan"]["context_tokens"]
    _set_context(engines, planned + 1)
    assert_error(onnx_run(capsys, video, engines), 2, f"is {planned + 1}, beyond the {planned} tokens its memory plan budgeted")


def test_a_context_whose_kv_cache_exceeds_the_machines_memory_is_refused(engines: Path, video: Path, capsys,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_PHYS_PAGES" else real(name))  # a one-page machine
    assert_error(onnx_run(capsys, video, engines), 2, "-token context needs a KV cache of at least", "--context-tokens")


# -- clear messages --------------------------------------------------------------------------


def test_a_long_question_is_blamed_not_max_new_tokens(video: Path, capsys) -> None:
    question = "where " * 20_000  # 120k characters: more tokens than the tiny model's context
    result = run(capsys, video, question, "--json", *FAST)
    message = assert_error(result, 2, "the question is")
    assert "--max-new-tokens" not in message and "shorten the question" in message


@pytest.mark.parametrize("how", ["argument", "interactive line"])
def test_a_huge_question_is_refused_by_its_length_before_tokenizing(how: str, video: Path, capsys,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from loc3r.models.tokenizer import TextTokenizer

    seen: list[int] = []
    real = TextTokenizer.encode
    monkeypatch.setattr(TextTokenizer, "encode", lambda self, text: seen.append(len(text)) or real(self, text))
    huge = "a" * 10_000_000
    if how == "argument":
        result = run(capsys, video, huge, "--json", *FAST)
        assert_error(result, 2, "the question is 10000000 characters long, more than the LLM's context of")
    else:
        monkeypatch.setattr("sys.stdin", io.StringIO(f"{huge}\nWhere am I?\n"))
        result = run(capsys, video, "-i", "--json", *FAST)
        assert result.code == 0 and "the question is 10000000 characters long" in result.err
    assert max(seen, default=0) < 1_000_000  # the huge text was never tokenized


def test_an_unreadable_shard_is_a_permission_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loc3r.errors import InputError
    from loc3r.models.convert_stream import read_safetensors_header

    shard = Path(shutil.copy(ensure_tiny_bundle() / "model.safetensors", tmp_path / "model-00001-of-00002.safetensors"))
    real = os.open

    def denied(path, flags, *args):  # noqa: ANN001, ANN202 - root reads anything: simulate chmod 000
        if Path(path) == shard:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(InputError) as caught:
        read_safetensors_header(shard)
    assert "permission denied" in str(caught.value) and "download" not in str(caught.value)


def test_a_fifo_shard_is_not_a_regular_file(tmp_path: Path) -> None:
    from loc3r.errors import InputError
    from loc3r.models.convert_stream import read_safetensors_header

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is not a regular file"):
        read_safetensors_header(fifo)
