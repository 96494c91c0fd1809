"""Time the viewer from upload to first overlay, in a real browser.

    python apps/benchmark_viewer.py --data-root ../shared/data [--repeats 3] [--inputs volume image] [--out bench.json]

For each repeat a fresh ``streamlit run apps/viewer.py`` is started and driven
by Playwright on Debian's chromium. The clock starts when the file is handed to
the page's upload widget and stops when the first overlay image has loaded in
the browser (``img.complete``, its caption naming the model). That covers the
upload, reading the file, loading the model (first upload of each kind only:
"cold"), the prediction, drawing the overlay and the PNG the browser fetches.
"Warm" uploads are further, different files with the model already loaded.
The time until the input itself shows (before the overlay replaces it) is
reported as "first picture".

Inputs: MSD hippocampus cases, and a 1040 x 1388 RGBA microscopy image. The
600 DSB2018 images in the shared data have no 1040 x 1388 one (those are among
the held-back 64), so that image is a real 1024 x 1024 DSB image resized to
1040 x 1388 with scikit-image (same pixel count and format as the real ones;
inference time depends only on the size). Warm repeats use its mirror images.

``--checkpoint PATH`` adds a checkpoint in the sidebar before uploading, for
measuring before the shipped models exist (the viewer picks it when no shipped
model suits the input). A breakdown of the server-side steps, timed directly
through the package, is printed too.

The floor: the same uploads, timed the same way, into a bare Streamlit page
that only shows a 420 x 420 picture captioned with the file's name
(``FLOOR_APP``: no decoding, no model). What it takes is Streamlit's upload and
rerun round trip plus the browser, which no change to the viewer can remove
(``--no-floor`` skips it). Its median is over every upload, the first of each
server included: a bare page has no model to load, so it has no cold case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: apps/ is then the import root, not the repository
from apps.browser import CHROMIUM_ARGS, chromium  # noqa: E402
from unetseg.choice import best_shipped_model  # noqa: E402

DSB_SOURCE = "08275a5b1c2dfcd739e8c4888a5ee2d29f83eccfa75185404ced1dc0866ea992"  # a real 1024 x 1024 DSB image
BIG = (1040, 1388)


def make_inputs(data_root: Path, folder: Path) -> dict[str, list[Path]]:
    """Hippocampus cases (unchanged) and 1040 x 1388 microscopy images written into ``folder``."""
    from PIL import Image
    from skimage.transform import resize

    task = data_root / "Task04_Hippocampus" / "imagesTr"
    volumes = [task / f"hippocampus_{i:03d}.nii.gz" for i in (1, 3, 4, 7, 8, 11)]
    source = np.asarray(Image.open(data_root / "dsb2018_stage1_train" / DSB_SOURCE / "images" / f"{DSB_SOURCE}.png"))
    big = np.round(resize(source, (*BIG, source.shape[2]), preserve_range=True, anti_aliasing=True)).astype(np.uint8)
    images = []
    for i, variant in enumerate((big, big[:, ::-1], big[::-1])):
        path = folder / f"dsb_{BIG[0]}x{BIG[1]}_{i}.png"
        Image.fromarray(np.ascontiguousarray(variant)).save(path)
        images.append(path)
    return {"volume": [p for p in volumes if p.is_file()], "image": images}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FLOOR_APP = """import hashlib

import numpy as np
import streamlit as st

left, right = st.columns(2)
upload = left.file_uploader("Scan or image")
right.file_uploader("Ground truth (optional)")
if upload is not None:
    colour = np.frombuffer(hashlib.md5(upload.name.encode()).digest()[:3], np.uint8)  # a new picture per file
    picture = np.broadcast_to(colour, (420, 420, 3))
    st.caption(f"{upload.name}: {len(upload.getvalue())} bytes")
    st.image(picture, caption=f"floor {upload.name}", output_format="PNG")
"""


def start_server(data_root: Path, log, script: Path) -> tuple[subprocess.Popen, str]:
    """``streamlit run script`` on a free local port; returns the process and its URL once it answers."""
    import urllib.request

    port = free_port()
    env = {**os.environ, "UNETSEG_DATA_ROOT": str(data_root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(script), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("streamlit did not start")


FIRST_IMAGE = """({previous, name}) => {
    const fresh = el => {
        const box = el.closest('[data-testid="stElementContainer"]');
        return !box || box.getAttribute('data-stale') !== 'true';
    };
    const current = [...document.querySelectorAll('[data-testid="stCaptionContainer"]')]
        .some(c => fresh(c) && c.innerText.includes(name));
    const box = [...document.querySelectorAll('[data-testid="stImage"]')].find(fresh);
    const img = box && box.querySelector('img');
    if (!current || !img || img.src === previous || !img.complete || img.naturalWidth === 0) return null;
    const caption = box.querySelector('[data-testid="stImageCaption"]');
    return {caption: (caption && caption.innerText) || '?', src: img.src};
}"""


PAGE_STATE = """() => [...document.querySelectorAll('[data-testid="stImage"], [data-testid="stCaptionContainer"]')].map(el => {
    const box = el.closest('[data-testid="stElementContainer"]');
    const img = el.querySelector('img');
    return [box && box.getAttribute('data-stale'), el.innerText.slice(0, 80), img ? img.src.slice(-40) : ''];
})"""


def wait_picture(page, arg: dict, timeout_ms: int = 240_000) -> dict[str, str]:
    """Caption and src of the first fresh, newly loaded picture; on timeout, says what the page showed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        return page.wait_for_function(FIRST_IMAGE, arg=arg, timeout=timeout_ms, polling=20).json_value()
    except PlaywrightTimeout:
        raise RuntimeError(f"no new picture for {arg}; page shows {page.evaluate(PAGE_STATE)}") from None


# True once the page's script run has ended: Streamlit shows its status widget ("Running...") only during a run.
IDLE = """() => !document.querySelector('[data-testid="stStatusWidget"]')"""


def time_upload(page, path: Path) -> tuple[float, float]:
    """Seconds from handing ``path`` to the upload widget until (a) a new picture and (b) the overlay have loaded.

    The viewer shows the input at once and replaces it with the overlay when
    the model is done; the overlay is the first picture whose caption does not
    start with "input". Only elements of the current run count (Streamlit marks
    the previous run's as stale), once the page names the new file.
    """
    page.wait_for_function(IDLE, timeout=120_000)  # the previous upload's run has ended: time this upload alone
    selector = '[data-testid="stImage"] img'
    previous = page.eval_on_selector(selector, "img => img.src") if page.locator(selector).count() else ""
    inputs = page.locator('[data-testid="stFileUploaderDropzoneInput"]')
    start = time.perf_counter()
    inputs.nth(0).set_input_files(str(path))
    picture = wait_picture(page, {"previous": previous, "name": path.name})
    first = time.perf_counter() - start
    while picture["caption"].startswith("input"):
        picture = wait_picture(page, {"previous": picture["src"], "name": path.name})
    return first, time.perf_counter() - start


def browser_run(data_root: Path, inputs: dict[str, list[Path]], checkpoints: list[str], log,
                script: Path = REPO / "apps" / "viewer.py") -> dict[str, list[tuple[float, float]]]:
    """One fresh server of ``script`` and browser; per kind of input, (first picture, first overlay) seconds of
    each upload in turn."""
    from playwright.sync_api import sync_playwright

    proc, url = start_server(data_root, log, script)
    out: dict[str, list[tuple[float, float]]] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').nth(1).wait_for(state="attached", timeout=120_000)
            for ckpt in checkpoints:
                box = page.get_by_role("textbox", name="Checkpoint path (optional)")
                box.fill(ckpt)
                box.press("Enter")
                page.wait_for_timeout(1500)
            for kind, files in inputs.items():
                out[kind] = [time_upload(page, f) for f in files]  # (first picture, first overlay)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def breakdown(inputs: dict[str, list[Path]], models: dict[str, str]) -> dict[str, dict[str, float]]:
    """Server-side steps of one cold upload per kind, timed through the package (a model with an int8 calibration
    in int8, as the viewer runs it by default, and then its prediction in float32 for comparison)."""
    import io

    from PIL import Image

    from unetseg import display, uploads
    from unetseg.infer import Segmenter

    result = {}
    for kind, files in inputs.items():
        data = files[0].read_bytes()
        t0 = time.perf_counter()
        image, meta = uploads.read_upload(files[0].name, data)
        t1 = time.perf_counter()
        int8 = has_int8_calibration(models[kind])  # the viewer's "Fast int8 inference" is on by default
        seg = Segmenter.from_checkpoint(models[kind], int8=int8)
        t2 = time.perf_counter()
        labels = seg.predict(image, channel_axis=0)
        t3 = time.perf_counter()
        shown = display.to_ras(image, meta.affine) if image.ndim == 4 else image
        picture = display.plane_slice(shown, "axial", shown.shape[-1] // 2) if image.ndim == 4 else shown
        lab = display.plane_slice(display.to_ras(labels, meta.affine), "axial", shown.shape[-1] // 2) if image.ndim == 4 else labels
        level, width = display.default_window(shown)
        rgb = display.upscale(display.overlay(display.apply_window(display.channels_last(picture), level, width), lab, seg.num_classes), 420)
        Image.fromarray(rgb).save(io.BytesIO(), format="PNG")
        t4 = time.perf_counter()
        float32_s = time_call(Segmenter.from_checkpoint(models[kind]).predict, image, channel_axis=0) if int8 else None
        result[kind] = {"read_s": t1 - t0, "load_model_s": t2 - t1, "predict_s": t3 - t2, "overlay_png_s": t4 - t3,
                        "shape": list(image.shape), "model": models[kind], "int8": int8,
                        "predict_float32_s": float32_s}
    return result


def has_int8_calibration(model: str) -> bool:
    """Whether the viewer runs ``model`` in int8 by default: it has a calibration that runs here."""
    from unetseg.infer import int8_validation

    return int8_validation(model)[0] is not None


def time_call(fn, *args, **kwargs) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("UNETSEG_DATA_ROOT", "../shared/data"))
    parser.add_argument("--repeats", type=int, default=3, help="fresh servers (default: %(default)s)")
    parser.add_argument("--checkpoint", action="append", default=[], help="extra checkpoint to add in the sidebar")
    parser.add_argument("--volume-model", help="model for the breakdown of volumes (default: the viewer's default "
                        "for them)")
    parser.add_argument("--image-model", help="model for the breakdown of 2D images (default: the viewer's default "
                        "for them)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the same uploads into a bare Streamlit page (default: %(default)s)")
    parser.add_argument("--inputs", nargs="+", choices=("volume", "image"), default=["volume", "image"],
                        help="which kinds of upload to time (default: both)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    data_root = Path(args.data_root).resolve()
    with tempfile.TemporaryDirectory(prefix="unetseg-bench-") as tmp:
        inputs = {kind: files for kind, files in make_inputs(data_root, Path(tmp)).items() if kind in args.inputs}
        runs = []
        with open(Path(tmp) / "server.log", "w") as log:
            for _ in range(args.repeats):
                runs.append(browser_run(data_root, inputs, args.checkpoint, log))
            floor_runs = []
            if args.floor:
                (Path(tmp) / "floor.py").write_text(FLOOR_APP)
                floor_runs = [browser_run(data_root, inputs, [], log, Path(tmp) / "floor.py")
                              for _ in range(args.repeats)]
        steps = breakdown(inputs, {"volume": args.volume_model or best_shipped_model("nifti"),
                                   "image": args.image_model or best_shipped_model("image2d")})
    summary = {}
    for kind in inputs:
        cold = [r[kind][0][1] for r in runs]
        warm = [t[1] for r in runs for t in r[kind][1:]]
        first = [t[0] for r in runs for t in r[kind]]
        summary[kind] = {"cold_median_s": statistics.median(cold), "warm_median_s": statistics.median(warm),
                         "first_picture_median_s": statistics.median(first), "cold_s": cold, "warm_s": warm,
                         "first_picture_s": first}
        if floor_runs:
            floor = [t[1] for r in floor_runs for t in r[kind]]
            summary[kind].update({"floor_median_s": statistics.median(floor), "floor_s": floor})
    result = {
        "summary": summary, "breakdown": steps,
        "machine": {"cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "python": platform.python_version(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
