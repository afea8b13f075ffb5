"""The server's parts without a model: which files a video URL may reach, remote fetches,
upload bookkeeping, the session LRU, the settings' safety checks."""

from __future__ import annotations

import http.server
import queue
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from serve_helpers import static_http

from loc3r.errors import InputError
from loc3r.runtime.demo_video import write_demo_video
from loc3r.serve.errors import ApiError
from loc3r.serve.media import MediaResolver
from loc3r.serve.sessions import SessionStore
from loc3r.serve.settings import ServeSettings, is_loopback
from loc3r.serve.uploads import UploadStore
from loc3r.serve.worker import WaitingQuestions


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp_path = tmp_path_factory.mktemp("folders")
    media = tmp_path / "media"
    write_demo_video(media / "a.mp4", num_frames=4, width=32, height=32)
    secret = write_demo_video(tmp_path / "secret" / "s.mp4", num_frames=4, width=32, height=32)
    (media / "out.mp4").symlink_to(secret)
    (media / "outdir").symlink_to(secret.parent, target_is_directory=True)
    (media / "in.mp4").symlink_to(media / "a.mp4")
    (media / "notes.txt").write_text("x")
    return SimpleNamespace(root=tmp_path, media=media, secret=secret)


def resolver(folders: SimpleNamespace, **settings: object) -> MediaResolver:
    config = ServeSettings(media_dir=folders.media, upload_dir=folders.root / "up", **settings)
    return MediaResolver(config, UploadStore(config.upload_dir, config.max_upload_bytes, config.upload_store_bytes))


def refused(resolve: MediaResolver, url: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        resolve.resolve(url)
    return caught.value


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("../secret/s.mp4", 403, "path_outside_media"),
        ("./../secret/s.mp4", 403, "path_outside_media"),
        (str(Path("/") / "etc" / "passwd"), 403, "path_outside_media"),
        ("out.mp4", 403, "path_outside_media"),
        ("outdir/s.mp4", 403, "path_outside_media"),
        ("file:///etc/passwd", 403, "url_scheme_refused"),
        ("file:a.mp4", 403, "url_scheme_refused"),
        ("ftp://127.0.0.1/a.mp4", 403, "url_scheme_refused"),
        ("data:video/mp4;base64,AAAA", 403, "url_scheme_refused"),
        ("https://127.0.0.1:9/a.mp4", 403, "remote_urls_disabled"),
        ("a.mp4\x00.txt", 400, "invalid_video_url"),
        ("", 400, "invalid_video_url"),
        ("missing.mp4", 404, "video_not_found"),
        ("%2e%2e/secret/s.mp4", 404, "video_not_found"),  # not decoded: a literal (absent) name
        ("vid_" + "0" * 24, 404, "video_not_found"),
        ("live:cam", 404, "live_source_not_found"),
    ],
)
def test_video_urls_outside_the_allowed_folders_are_refused(folders: SimpleNamespace, url: str, status: int, code: str) -> None:
    error = refused(resolver(folders), url)
    assert (error.status, error.code) == (status, code)
    assert str(folders.secret) not in error.message


def test_media_paths_resolve_inside_the_folder(folders: SimpleNamespace) -> None:
    resolve = resolver(folders)
    assert resolve.resolve("a.mp4").path == (folders.media / "a.mp4").resolve()
    assert resolve.resolve("in.mp4").path == (folders.media / "a.mp4").resolve()  # a link that stays inside
    assert {"a.mp4", "in.mp4"} <= set(resolve.media_files()) and "out.mp4" not in set(resolve.media_files())


def test_a_rewritten_file_is_another_video(folders: SimpleNamespace) -> None:
    resolve = resolver(folders)
    write_demo_video(folders.media / "sub" / "b.mp4", num_frames=4, width=32, height=32)
    before = resolve.resolve("sub/b.mp4").key
    write_demo_video(folders.media / "sub" / "b.mp4", num_frames=6, width=32, height=32)
    assert resolve.resolve("sub/b.mp4").key != before


def test_no_media_folder_means_uploads_only(tmp_path: Path) -> None:
    config = ServeSettings(upload_dir=tmp_path / "up")
    resolve = MediaResolver(config, UploadStore(config.upload_dir, 1 << 20, 1 << 30))
    assert refused(resolve, "a.mp4").code == "video_not_found"
    assert list(resolve.media_files()) == []


def test_remote_urls_are_fetched_once_within_the_size_limit(folders: SimpleNamespace) -> None:
    with static_http(folders.media) as base:
        resolve = resolver(folders, allow_remote_urls=True, allow_private_urls=("127.0.0.1",))
        first = resolve.resolve(f"{base}/a.mp4")
        assert first.path.read_bytes() == (folders.media / "a.mp4").read_bytes()
        assert resolve.resolve(f"{base}/a.mp4").key == first.key  # downloaded once
        assert refused(resolve, f"{base}/notes.txt").code == "invalid_video"
        assert refused(resolve, f"{base}/absent.mp4").code == "remote_video_unavailable"
        small = resolver(folders, allow_remote_urls=True, allow_private_urls=("127.0.0.1",), max_upload_bytes=100)
        assert refused(small, f"{base}/a.mp4").code == "upload_too_large"


@pytest.mark.parametrize(
    ("location", "code"),
    [("ftp://127.0.0.1/v.mp4", "remote_redirect_refused"), ("file:///etc/passwd", "remote_redirect_refused")],
)
def test_remote_redirects_to_other_schemes_are_refused(folders: SimpleNamespace, location: str, code: str) -> None:
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(302)
            self.send_header("Location", location)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        error = refused(resolver(folders, allow_remote_urls=True, allow_private_urls=("127.0.0.1",)), f"http://127.0.0.1:{server.server_address[1]}/v.mp4")
    finally:
        server.shutdown()
        server.server_close()
    assert error.code == code


def test_uploads_beyond_the_store_budget_delete_the_oldest(tmp_path: Path) -> None:
    video = write_demo_video(tmp_path / "v.mp4", num_frames=4, width=32, height=32)
    size = video.stat().st_size
    store = UploadStore(tmp_path / "up", max_bytes=size, store_bytes=2 * size)
    ids = []
    for _ in range(3):
        with video.open("rb") as stream:
            ids.append(store.save(stream, "v.mp4").id)
    assert [info.id for info in store.list()] == ids[1:]
    with pytest.raises(ApiError, match="video_not_found|no video"):
        store.path(ids[0])


def fake_session(nbytes: int, duration_s: float | None = None, kv_bytes: int = 0, source: str = "") -> SimpleNamespace:
    """A session of ``nbytes`` of encoded frames; complete (``duration_s``) ones have a scene of ``kv_bytes``."""
    session = SimpleNamespace(encoded=SimpleNamespace(blocks=[torch.zeros(nbytes, dtype=torch.uint8)]), reclaimed=[],
                              duration_s=duration_s, source=source)
    session.reclaim_cache = lambda scene=None: session.reclaimed.append(scene)
    session.scene = lambda: SimpleNamespace(nbytes=kv_bytes, of=source)
    return session


def test_session_lru_is_bounded_by_bytes_and_keeps_pinned_sessions() -> None:
    store = SessionStore(budget_bytes=300)
    a, b, c, live = (fake_session(100) for _ in range(4))
    store.add("live", live)
    store.add("a", a, pinned=frozenset({"live"}))
    store.add("b", b, pinned=frozenset({"live"}))
    assert store.get("a") is a  # a is now more recent than b
    assert store.add("c", c, pinned=frozenset({"live"})) == 1
    assert store.get("b") is None and store.get("live") is live and store.get("a") is a
    assert store.resident is c
    assert store.make_resident(a) == "prefill" and a.reclaimed == [None]
    assert store.make_resident(a) is None and a.reclaimed == [None]


def test_resident_scenes_kv_is_an_lru_under_its_budget_spilled_to_the_store() -> None:
    spilled, stored = [], {"d"}
    store = SessionStore(budget_bytes=10_000, kv_budget_bytes=250,
                         load_scene=lambda s: SimpleNamespace(nbytes=100, of=s.source) if s.source in stored else None,
                         spill=lambda s, scene: spilled.append(scene.of))
    a, b, c, d = (fake_session(10, 1.0, 100, name) for name in "abcd")
    for name, session in zip("abc", (a, b, c), strict=True):
        store.add(name, session)  # each one's arrival holds the KV of the one before
    assert store.resident_scenes() == ["a", "b"] and store.kv_bytes() == 200
    assert store.make_resident(a) == "memory" and a.reclaimed[-1].of == "a"  # c held: b, the least recent, spilled
    assert spilled == ["b"] and store.resident_scenes() == ["c", "a"]
    assert store.make_resident(b) == "prefill"  # spilled, and the store does not have it: recomputed
    store.add("d", d)  # b held: c spilled
    assert store.make_resident(d) is None and spilled == ["b", "c"]
    assert store.make_resident(c) == "prefill"  # d held: a spilled
    assert store.make_resident(d) == "memory" and spilled == ["b", "c", "a", "b"] and store.kv_bytes() <= 250
    stored.add("a")
    assert store.make_resident(a) == "store" and a.reclaimed[-1].of == "a"
    assert store.sources == {"memory": 2, "store": 1, "prefill": 2}


def test_a_session_over_budget_alone_is_kept_while_it_is_the_newest() -> None:
    store = SessionStore(budget_bytes=50)
    big = fake_session(100)
    assert store.add("big", big) == 0 and store.get("big") is big


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
                                                ("0.0.0.0", False), ("192.168.1.4", False), ("::", False), ("example.org", False)])
def test_binding_beyond_loopback_needs_a_key(host: str, loopback: bool, tmp_path: Path) -> None:
    assert is_loopback(host) is loopback
    if loopback:
        ServeSettings(host=host).check()
    else:
        with pytest.raises(InputError, match="--api-key"):
            ServeSettings(host=host).check()
        ServeSettings(host=host, api_key="k").check()


def waiting(*keys: str, max_passes: int = 2) -> WaitingQuestions:
    line = WaitingQuestions(capacity=len(keys) + 1, max_passes=max_passes)
    for number, key in enumerate(keys):
        line.put_nowait(SimpleNamespace(session_key=key, passed_over=0, number=number))
    return line


def test_questions_on_the_cached_video_go_first_within_a_bound() -> None:
    line = waiting("a", "b", "a", "b", "b")
    taken = [line.get(prefer="b", timeout=0).number for _ in range(5)]
    assert taken == [1, 3, 0, 4, 2]  # "a" (0) passed over twice, then served; then b again
    with pytest.raises(queue.Empty):
        line.get(prefer="b", timeout=0.01)


def test_without_a_cached_video_the_queue_is_fifo_and_bounded() -> None:
    line = waiting("a", "b", "c")
    line.put_nowait(SimpleNamespace(session_key="d", passed_over=0, number=3))
    with pytest.raises(queue.Full):
        line.put_nowait(SimpleNamespace(session_key="e", passed_over=0, number=4))
    assert [line.get(prefer=None, timeout=0).number for _ in range(4)] == [0, 1, 2, 3]
    line.close()
    assert line.get(prefer=None, timeout=None) is None


def test_media_listing_shows_real_videos_only_and_skips_hidden_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A project checkout as --media-dir: a .venv with thousands of files, TypeScript's
    ``.d.ts`` files, a text file named like a video: only the videos are listed, every
    container kind the server reads is recognised, and the scan says when it was bounded."""
    from loc3r.serve import media

    root = tmp_path / "project"
    for name in ("room.mp4", "clips/hall.mkv", "clips/door.ts", "old/film.avi", "webcam.mov"):
        write_demo_video(root / name, num_frames=2, width=32, height=32)
    write_demo_video(root / ".venv" / "lib" / "sample.mp4", num_frames=2, width=32, height=32)
    write_demo_video(root / ".hidden.mp4", num_frames=2, width=32, height=32)
    for number in range(300):
        (root / ".venv" / "lib" / f"module{number}.py").write_text("x = 1\n")
    (root / "node_modules" / "types").mkdir(parents=True)
    (root / "node_modules" / "types" / "index.d.ts").write_text("export declare const G: number;\n" * 40)
    (root / "notes.mp4").write_text("not a video\n")
    listing = resolver(SimpleNamespace(media=root, root=tmp_path)).media_files()
    assert listing.paths == ["room.mp4", "webcam.mov", "clips/door.ts", "clips/hall.mkv", "old/film.avi"]
    assert listing.bounded is None

    monkeypatch.setattr(media, "MAX_SCANNED", 4)
    small = media.scan_videos(root)
    assert len(small.paths) < 5 and small.bounded.startswith("listing stopped: more than 4 files in the media folder")
    monkeypatch.setattr(media, "MAX_SCANNED", 5000)
    monkeypatch.setattr(media, "MAX_DEPTH", 0)
    shallow = media.scan_videos(root)
    assert shallow.paths == ["room.mp4", "webcam.mov"] and shallow.bounded == "folders deeper than 0 levels are not listed"
    monkeypatch.setattr(media, "MAX_LISTED", 1)
    assert media.scan_videos(root).bounded == "listing stopped at 1 videos; name others by their path"


@pytest.mark.parametrize(
    ("head", "video"),
    [
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81", True),  # WebM / Matroska EBML header
        (b"\x00\x00\x01\xba\x44\x00\x04\x00", True),  # MPEG-PS pack header (.mpg)
        (b"\x00\x00\x00\x20ftypisom", True),
        (b"\x00\x00\x00\x00" + (b"G" + bytes(191)) * 3, True),  # M2TS
        (b"G" + bytes(187) + b"G" + bytes(10), True),  # two TS packets' sync bytes
        (b"G" + bytes(50), False),  # one 'G' is not a transport stream
        (b"export declare const x: number;\n", False),  # a TypeScript .d.ts
        (b"", False),
    ],
)
def test_container_signatures(tmp_path: Path, head: bytes, video: bool) -> None:
    from loc3r.serve.media import is_video_container

    (tmp_path / "f").write_bytes(head)
    assert is_video_container(tmp_path / "f") is video
