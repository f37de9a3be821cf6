"""The web app's correction inputs in a real Chromium: a correction typed under a photo (and
under a video's followed face) ends up in the session Serve's corrections folder.

The set-up of tests/webapp/test_app.py (Debian's Chromium, Streamlit on a free loopback port, the
session's Serve), with two differences: this module runs a Streamlit of its own, and drives
Chromium from a thread of its own, because test_app.py's session-scoped Playwright (sync API)
holds the main thread's event loop and a second one cannot start there.
"""

from __future__ import annotations

import csv
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import test_app
from PIL import Image
from test_app import CHROMIUM, STEP_MS, upload, wait_idle

from faceage.runtime import free_port, stop_session
from faceage.up import start_streamlit, wait_streamlit

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.browser]
# test_app.py's fixtures that start no browser: the artifacts folder, the tool check, the clip.
artifacts, browser_tools, face_video = (test_app.artifacts, test_app.browser_tools,
                                        test_app.face_video)


@pytest.fixture(scope="module")
def app_url(browser_tools, serve_url, artifacts):
    """``app/main.py`` on a free loopback port, talking to the session's Serve."""
    port = free_port()
    log = artifacts / "streamlit-corrections.log"
    proc = start_streamlit(port, serve_url, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_streamlit(proc, url, log)
        yield url
    finally:
        stop_session(proc.pid, timeout=20)
        proc.wait(10)


def in_chromium(url: str, steps, screenshot: Path):
    """``steps(page)`` on ``url`` in a Chromium of its own, on a thread of its own; the page's
    last look saved to ``screenshot``."""
    from playwright.sync_api import sync_playwright

    def run():
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update",
                      "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1100})
                page.set_default_timeout(STEP_MS)
                page.goto(url)
                wait_idle(page)
                try:
                    return steps(page)
                finally:
                    page.screenshot(path=str(screenshot), full_page=True, timeout=30_000)
            finally:
                browser.close()

    with ThreadPoolExecutor(1, thread_name_prefix="chromium") as pool:
        return pool.submit(run).result()


def send_age(page, container, age: int) -> str:
    """Type ``age`` into the container's first correction input, press Send; the entry id the
    page reports."""
    form = container.locator('[class*="st-key-correct-"]').first
    form.wait_for()
    wait_idle(page)
    field = form.locator("input[type=number]")
    field.fill(str(age))
    field.press("Tab")
    form.get_by_role("button", name="Send").click()
    done = form.filter(has_text="Stored")
    done.wait_for(timeout=STEP_MS)
    found = re.search(r"Entry ([0-9a-f]{16})", done.inner_text())
    assert found, done.inner_text()
    return found[1]


def stored_row(folder: Path, entry: str) -> dict:
    with open(folder / "manifest.csv", newline="") as f:
        [row] = [r for r in csv.DictReader(f) if r["id"] == entry]
    return row


def test_a_photo_correction_reaches_the_manifest(app_url, serve_corrections_dir, astronaut_path,
                                                artifacts):
    def steps(page):
        upload(page, "photos", astronaut_path)
        result = page.locator(".st-key-photo-0")
        result.locator("table").wait_for()
        note = result.filter(has_text="not your photo").inner_text()
        entry = send_age(page, result, 41)
        exceptions = page.locator('[data-testid="stException"]').count()
        return note, entry, result.locator("table").inner_text(), exceptions

    note, entry, table, exceptions = in_chromium(app_url, steps,
                                                 artifacts / "corrections-photo.png")
    assert str(serve_corrections_dir) in note and "the model's answer and version" in note
    row = stored_row(serve_corrections_dir, entry)
    assert row["age"] == "41" and Image.open(serve_corrections_dir / row["path"]).format == "JPEG"
    assert f"{float(row['predicted']):.1f}" in table
    assert exceptions == 0


def test_a_video_face_correction_reaches_the_manifest(app_url, serve_corrections_dir, face_video,
                                                     artifacts):
    def steps(page):
        page.get_by_role("tab", name="Video").click()
        upload(page, "video", face_video)
        button = page.get_by_role("button", name="Annotate video")
        button.wait_for()
        wait_idle(page)
        button.click()
        result = page.locator(".st-key-video-result")
        result.wait_for(timeout=STEP_MS * 2)
        return send_age(page, result, 52), page.locator('[data-testid="stException"]').count()

    entry, exceptions = in_chromium(app_url, steps, artifacts / "corrections-video.png")
    row = stored_row(serve_corrections_dir, entry)
    assert row["age"] == "52" and (serve_corrections_dir / row["path"]).is_file()
    assert exceptions == 0
