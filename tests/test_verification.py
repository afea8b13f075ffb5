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
