"""End to end in a real browser: `streamlit run apps/viewer.py` driven by Playwright on a system Chromium
(``apps/browser.py``: ``$UNETSEG_CHROMIUM``, else one on the PATH, else Debian's, installed by the test).

Uploads a real hippocampus case and its label through the page's own upload
widgets, checks that the overlay image loads and that the Dice values equal
``unetseg evaluate``'s for the case (default model hippocampus_3d), turns on compare mode (paired with its twin hippocampus_3d_noskip),
saves the page (to ``$UNETSEG_SCREENSHOT``, e.g. ``docs/app_screenshot.png``, else a temp folder), and checks that a broken file
shows one error and no traceback, after which the page recovers. Also: at 1280 x 720 the first picture is above
the fold, and a second volume followed at once by its label keeps the volume model (a picker reset once made it
``dsb2018_2d``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from unetseg.data.datasets import DATA_ROOT_ENV, dataset_info, list_cases, load_cases
from unetseg.evaluate import evaluate_cases
from unetseg.infer import Segmenter

from apps.browser import CHROMIUM_ARGS, chromium

from .conftest import REPO
from .test_app import CASE, hippocampus_files, require_shipped

# The README's screenshot is refreshed only on request (UNETSEG_SCREENSHOT=docs/app_screenshot.png),
# so a test run never modifies tracked files.
SCREENSHOT_TARGET = os.environ.get("UNETSEG_SCREENSHOT")
MODEL = "hippocampus_3d"  # the viewer's default for volumes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"streamlit did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(data_root, tmp_path_factory):
    """The viewer as users start it, from the repository root, on a free local port."""
    require_shipped("hippocampus_3d", "hippocampus_3d_noskip", "hippocampus_2d")
    streamlit = shutil.which("streamlit", path=str(Path(sys.executable).parent)) or shutil.which("streamlit")
    assert streamlit, "the streamlit command is not installed in this environment"
    port = free_port()
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = {**os.environ, DATA_ROOT_ENV: str(data_root), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    before = {p.name for p in REPO.iterdir()} | {f"apps/{p.name}" for p in (REPO / "apps").iterdir()}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [streamlit, "run", "apps/viewer.py", "--server.headless", "true", "--server.port", str(port),
             "--server.address", "127.0.0.1"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    after = {p.name for p in REPO.iterdir()} | {f"apps/{p.name}" for p in (REPO / "apps").iterdir()}
    assert after - before - {".pytest_cache", "apps/__pycache__"} == set(), "the viewer wrote into the working directory"


@pytest.fixture(scope="module")
def browser():
    try:
        executable = chromium()  # $UNETSEG_CHROMIUM, else one on the PATH, else Debian's, installed here
    except RuntimeError as exc:
        pytest.fail(str(exc))
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def expected_row(data_root: Path) -> dict:
    """``unetseg evaluate``'s per-case row for CASE with the default model for volumes (hippocampus_3d)."""
    segmenter = Segmenter.from_checkpoint("hippocampus_3d")
    refs, info = list_cases(dataset_info("hippocampus"), data_root)
    cases = load_cases([r for r in refs if r.case_id == CASE], info, segmenter.preprocessing.normalization)
    return evaluate_cases(segmenter, cases, progress=False)[0]


def test_upload_case_and_label_shows_overlay_and_dice_then_survives_a_bad_file(server, browser, data_root, tmp_path):
    image_path, label_path = hippocampus_files(data_root)
    page = browser.new_page(viewport={"width": 1400, "height": 2300})
    page.goto(server)
    page.get_by_text("Upload a scan or image").wait_for(timeout=60_000)
    inputs = page.locator('[data-testid="stFileUploaderDropzoneInput"]')
    inputs.nth(1).wait_for(state="attached", timeout=30_000)
    assert inputs.count() == 2

    inputs.nth(0).set_input_files(str(image_path))
    overlay = page.locator('[data-testid="stImage"]').filter(has_text=f"{MODEL}: axial slice").locator("img")
    overlay.wait_for(timeout=120_000)  # the input shows first; the overlay replaces it when the model is done
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle(), timeout=30_000)
    assert_first_picture_above_the_fold(page)

    inputs.nth(1).set_input_files(str(label_path))
    page.get_by_text("Mean foreground Dice").wait_for(timeout=60_000)
    row = expected_row(data_root)
    table = page.locator('[data-testid="stTable"]').filter(has_text="HD95 (mm)")
    table.wait_for(timeout=30_000)
    text = table.inner_text()
    for name in ("anterior", "posterior"):
        assert f"{row[f'dice_{name}']:.4f}" in text, (name, text)
    page.get_by_text("Compare two models").click()  # paired with its no-skip twin
    page.get_by_text("disagreement (green)").wait_for(timeout=60_000)
    assert page.get_by_text("hippocampus_3d_noskip: axial slice").count() >= 1
    page.wait_for_timeout(1000)  # let the last images paint
    shot = REPO / SCREENSHOT_TARGET if SCREENSHOT_TARGET else tmp_path / "app_screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000

    broken = tmp_path / image_path.name
    broken.write_bytes(image_path.read_bytes()[:20_000])
    inputs.nth(0).set_input_files(str(broken))
    alert = page.locator('[data-testid="stAlert"]').filter(has_text="not a readable NIfTI file")
    alert.wait_for(timeout=60_000)
    assert alert.count() == 1
    assert "Traceback" not in page.content()

    inputs.nth(0).set_input_files(str(image_path))  # and the page recovers; a new image starts without ground truth
    page.get_by_text(f"{MODEL}: axial slice").first.wait_for(timeout=60_000)
    assert page.locator('[data-testid="stImage"] img').count() >= 2

    # Volume B, then B's label before B's page is done: the model picker once came back as dsb2018_2d (its first
    # option) in 3 of 5 tries and the overlay vanished. B's axial middle slice is 19.
    other, other_label = hippocampus_files(data_root, "hippocampus_004")
    inputs.nth(0).set_input_files(str(other))
    page.wait_for_timeout(500)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').nth(1).set_input_files(str(other_label))
    page.get_by_text("Mean foreground Dice").wait_for(timeout=60_000)
    page.get_by_text(f"{MODEL}: axial slice 19").first.wait_for(timeout=30_000)
    assert page.locator('[data-testid="stMain"] [data-testid="stAlert"]').count() == 0  # no "pick a volume model"
    page.close()


def assert_first_picture_above_the_fold(page) -> None:
    """At 1280 x 720 (a laptop) the first picture starts high enough that its upper half is on screen."""
    page.set_viewport_size({"width": 1280, "height": 720})
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(500)  # let the layout settle at the new width
    box = page.locator('[data-testid="stImage"] img').first.bounding_box()
    assert box is not None and box["y"] + box["height"] / 2 < 720, f"first picture at {box} in a 1280 x 720 window"
    page.set_viewport_size({"width": 1400, "height": 2300})


def test_chromium_is_found_from_the_environment_override_or_the_path(monkeypatch, tmp_path):
    from apps import browser

    fake = tmp_path / "my-chrome"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(browser.CHROMIUM_ENV, str(fake))
    assert browser.chromium(install=False) == str(fake)
    monkeypatch.setenv(browser.CHROMIUM_ENV, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="UNETSEG_CHROMIUM=.*missing.* is not an executable"):
        browser.find_chromium()
    monkeypatch.delenv(browser.CHROMIUM_ENV)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "chromium-browser").symlink_to(fake)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert browser.find_chromium() == str(tmp_path / "bin" / "chromium-browser")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="no Chromium found .* set \\$UNETSEG_CHROMIUM"):
        browser.chromium(install=False)
