"""The web page in a real browser (Debian's Chromium driven by Playwright): pick and upload
a video, ask, watch the answer stream in, and check the screenshots' pixels: the map is
drawn, the heading arrow points where the pose says, the answer is the API's answer."""

from __future__ import annotations

import math
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import chat_body, tiny_pipeline

from loc3r.runtime.demo_video import write_demo_video
from loc3r.serve.server import build_server, running
from loc3r.serve.settings import ServeSettings

CHROMIUM = Path("/usr/bin/chromium")
# as root, in a sandbox with no network: the flags the machine notes give for headless Chromium
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARROW_RGB = (228, 87, 46)  # #e4572e in style.css
POSITION_RGB = (35, 49, 63)  # #23313f
QUESTION = "Where am I?"
LONG_NAME = "zz-" + "a-very-long-video-file-name-" * 6 + ".mp4"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium): apt-get install chromium (.ci/run does where apt works)"
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("page")
    write_demo_video(root / "media" / "room.mp4", num_frames=20, width=160, height=120)
    write_demo_video(root / "media" / LONG_NAME, num_frames=4, width=32, height=32)  # a wide select must not hide Upload
    settings = ServeSettings(media_dir=root / "media", upload_dir=root / "uploads", max_frames=4)
    with running(build_server(tiny_pipeline(), settings)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201 - playwright's Browser
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def pixels(path: Path, box: dict[str, float]) -> np.ndarray:
    """The screenshot's pixels inside ``box`` (an element's bounding box), (h, w, 3)."""
    image = np.asarray(Image.open(path).convert("RGB"))
    top, left = round(box["y"]), round(box["x"])
    return image[top : top + round(box["height"]), left : left + round(box["width"])]


def mask(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> np.ndarray:
    return np.all(np.abs(image.astype(int) - rgb) <= tolerance, axis=-1)


def ask(page, question: str) -> None:  # noqa: ANN001 - playwright's Page
    page.fill("#question", question)
    page.click("#ask")
    done = "document.getElementById('ask').disabled === false && document.getElementById('answer').textContent.length > 0"
    page.wait_for_function(done, timeout=120_000)


def test_page_answers_and_draws_the_pose(site: str, browser, tmp_path: Path) -> None:  # noqa: ANN001
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(site)
    page.wait_for_function("document.querySelectorAll('#videos option').length > 0")
    assert page.input_value("#videos") == "room.mp4"
    assert "RANDOM WEIGHTS" in page.inner_text("#banner")
    page.wait_for_function("document.getElementById('player').readyState >= 1")  # the video is shown
    assert page.evaluate("document.getElementById('player').duration") == pytest.approx(2.5, abs=0.2)

    before = tmp_path / "before.png"
    page.screenshot(path=before)
    map_box = page.locator("#map").bounding_box()
    assert mask(pixels(before, map_box), ARROW_RGB).sum() == 0  # no pose yet

    ask(page, QUESTION)
    after = tmp_path / "answered.png"
    page.screenshot(path=after)
    expected = httpx.post(f"{site}/v1/chat/completions", json=chat_body("room.mp4", QUESTION, max_tokens=64), timeout=120).json()
    assert page.inner_text("#answer") == expected["choices"][0]["message"]["content"]

    drawn = pixels(after, map_box)
    arrow, position = mask(drawn, ARROW_RGB), mask(drawn, POSITION_RGB)
    assert arrow.sum() > 200 and position.sum() > 20  # the arrow and the position dot are drawn
    layout = mask(drawn, (185, 195, 208), tolerance=30) & ~arrow  # layout points (grey-blue over white)
    assert layout.sum() > 50
    theta = expected["loc3r"]["orientation"]["theta_rad"]
    ys, xs = np.nonzero(arrow)
    py, px = (np.mean(axis) for axis in np.nonzero(position))
    drawn_angle = math.atan2(-(ys.mean() - py), xs.mean() - px)  # screen y points down
    assert abs(math.remainder(drawn_angle - theta, math.tau)) < math.radians(10)
    assert "queue_wait_s" in page.inner_text("#timings")
    assert "confidence: none (no calibration for this bundle" in page.inner_text("#pose-text")  # the tiny bundle has none

    check_map_labels(page)
    timings = [row.split("\t") for row in page.inner_text("#timings tbody").splitlines()]
    assert timings and all(value.endswith((" s", " tok/s")) for _, value in timings), timings
    upload = page.locator("label.button").bounding_box()
    left = page.locator("#left").bounding_box()
    assert upload["width"] > 40 and upload["x"] + upload["width"] <= left["x"] + left["width"] + 1  # not pushed out by the select

    ask(page, "What is on my left?")
    assert page.locator("#trail circle.past").count() == 1  # the first answer's position
    answered = page.inner_text("#answer")
    page.evaluate("document.getElementById('answer').textContent = 'position'.repeat(300)")  # one unbreakable 2400-letter word
    answer = page.locator("#answer").bounding_box()
    assert page.evaluate("(e => e.scrollWidth <= e.clientWidth + 1)(document.getElementById('answer'))")  # wrapped, no overflow
    assert answer["x"] + answer["width"] <= map_box["x"]  # it stays left of the map
    assert answer["height"] > 100  # many lines
    page.evaluate("text => { document.getElementById('answer').textContent = text; }", answered)
    assert not errors, errors
    if os.environ.get("LOC3R_PAGE_SCREENSHOT"):  # docs/serve-page.png is made this way
        page.screenshot(path=os.environ["LOC3R_PAGE_SCREENSHOT"])


def check_map_labels(page) -> None:  # noqa: ANN001 - playwright's Page
    """The map's axes are labelled in metres at evenly spaced ticks, with a scale bar and a legend."""
    for axis in ("x", "y"):
        ticks = [float(t) for t in page.locator(f"#labels text.tick.{axis}").all_text_contents()]
        assert len(ticks) >= 3, ticks
        steps = {round(b - a, 6) for a, b in zip(ticks, ticks[1:])}
        assert len(steps) == 1 and steps.pop() != 0, ticks  # one step: a regular grid (y counts down the page)
    titles = page.locator("#labels text.axis-title").all_text_contents()
    assert titles == ["x (m) →", "↑ y (m)"]
    assert page.text_content("#labels text.scale-label").endswith(" m")
    legend = page.inner_text("#legend")
    for entry in ("layout", "position", "σ (uncertainty)", "heading", "earlier answers"):
        assert entry in legend


def test_page_uploads_a_video_and_asks_about_it(site: str, browser, tmp_path: Path) -> None:  # noqa: ANN001
    clip = write_demo_video(tmp_path / "my clip.mp4", num_frames=12, width=160, height=120)
    page = browser.new_page()
    page.goto(site)
    page.wait_for_function("document.querySelectorAll('#videos option').length > 0")
    page.set_input_files("#upload", str(clip))
    page.wait_for_function("document.getElementById('videos').selectedOptions[0].textContent.includes('my clip.mp4')")
    assert page.input_value("#videos").startswith("vid_")
    statuses = "window.statuses = []; new MutationObserver(() => statuses.push(document.getElementById('status').textContent))"
    page.evaluate(statuses + ".observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true})")
    ask(page, QUESTION)
    progress = [text for text in page.evaluate("window.statuses") if text.startswith("encoding frames ")]
    frames = [tuple(map(int, text.split()[2].rstrip("…").split("/"))) for text in progress]
    assert frames == [(done, 4) for done in range(1, 5)], progress  # streamed frame by frame (the site's 4-frame limit)
    assert page.locator("#pose-arrow").count() == 1
    assert "video opened" in page.inner_text("#status")  # its first question encoded it


def test_page_shows_an_answer_without_a_pose(site: str, browser, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Damaged weights give a non-finite pose, sent as null: the page says so and throws nothing."""
    heads = tiny_pipeline().stages.heads
    real_pose = heads.pose

    def nan_pose(*args: object) -> tuple:
        return tuple(value * float("nan") for value in real_pose(*args))

    monkeypatch.setattr(heads, "pose", nan_pose)
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(site)
    page.wait_for_function("document.querySelectorAll('#videos option').length > 0")
    ask(page, "Where is the door?")
    assert page.inner_text("#pose-text") == "no pose: the model gave a non-finite position (null)"
    assert page.locator("#pose-arrow").count() == 0
    assert "queue_wait_s" in page.inner_text("#timings")
    assert not errors, errors


def test_page_locates_several_situations_on_one_map(site: str, browser) -> None:  # noqa: ANN001
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(site)
    page.wait_for_function("document.querySelectorAll('#videos option').length > 0")
    situations = ["I am by the sink", "I stand at the door", "I sit on the bed"]
    page.fill("#situations", "\n".join(situations))
    page.click("#locate")
    page.wait_for_function("document.querySelectorAll('#located-list li').length === 3", timeout=120_000)
    assert page.locator("#located .located-arrow").count() == 3 and page.locator("#located .located-label").count() == 3
    expected = httpx.post(f"{site}/v1/locate", json={"scene": "room.mp4", "situations": situations}, timeout=120).json()["poses"]
    items = page.locator("#located-list li").all_inner_texts()
    for item, pose in zip(items, expected, strict=True):
        assert item.startswith(f"{pose['situation']}: x {pose['position']['x']:.2f} m, y {pose['position']['y']:.2f} m")
        assert "confidence: none" in item
    assert not errors
