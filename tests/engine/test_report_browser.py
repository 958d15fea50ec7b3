"""report.html in a real browser: headless Chromium loads the page and every embedded image decodes.

The page itself holds no script (tests/engine/test_report.py checks that). This test writes a copy
of it into its own tmp folder with a small checking script added, loads the copy with
``chromium --headless --dump-dom`` and reads back, per <img>, whether it loaded and its natural size,
which must be the size in the PNG's own header. A broken data URI added to the copy proves that the
check sees a failed image. Skipped, with the reason, where no Chromium is installed (`.ci/run`
installs Debian's `chromium` when it can).
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess

import pytest

from cnnlab.engine.html_report import write_html_report
from tests.engine.test_report import Page, png_bytes, run  # noqa: F401 - `run` is the fixture: one real tiny run

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHECK = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify([...document.images].map(
    (img) => [img.getAttribute("data-control") || "", img.complete, img.naturalWidth, img.naturalHeight]));
  document.body.appendChild(out);
});
</script>"""
BROKEN = '<img data-control="broken" alt="control" src="data:image/png;base64,AAAAAAAA">'


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no Chromium on PATH (looked for {', '.join(BROWSERS)}); `.ci/run` installs Debian's chromium "
                "when it runs as root with apt-get, or: apt-get install chromium")


def png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])  # IHDR: width, height (PNG spec, section 11.2.2)


def test_every_image_loads_in_chromium(run, tmp_path):  # noqa: F811 - the fixture imported above
    chromium = browser()
    text = write_html_report(run, tmp_path / "report.html").read_text(encoding="utf-8")
    expected = [png_size(png_bytes(src)) for src in Page(text).imgs]
    assert len(expected) >= 2  # curves and confusion matrix at least
    checked = tmp_path / "checked.html"
    checked.write_text(text.replace("</body>", BROKEN + CHECK + "</body>"), encoding="utf-8")
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="image-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"chromium gave no image report (exit {done.returncode}): {done.stderr[-2000:]}"
    images = json.loads(found.group(1).replace("&quot;", '"'))
    control = [i for i in images if i[0] == "broken"]
    page = [i for i in images if i[0] != "broken"]
    assert control == [["broken", True, 0, 0]]  # a broken image is seen as one: the check can fail
    assert [(w, h) for _, complete, w, h in page] == expected and all(i[1] for i in page)


def test_the_check_reads_png_headers():
    data = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAMAAAACCAYAAACddGYaAAAAEUlEQVR4nGP8z8DwnwEJAAA"
                            "i5AMAzl9h4wAAAABJRU5ErkJggg==")
    assert png_size(data) == (3, 2)
