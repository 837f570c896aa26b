"""Open a local HTML file in headless Chromium (Debian package ``chromium``) when it is installed.

The report itself holds no script: a copy gets one that, once the page has loaded, writes into the body
how many images there are and how many decoded with a size, then ``--dump-dom`` prints the rendered DOM.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000", "--virtual-time-budget=5000"]
PROBE = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
         "document.body.setAttribute('data-images',i.length+'/'+i.filter(x=>x.complete&&x.naturalWidth>0)"
         ".length);});</script>")


def _run(args: list[str], profile: str) -> str:
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout


def rendered_images(report: Path) -> tuple[int, int]:
    """(images in the page, images that decoded with a size) as Chromium renders ``report``."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
        dom = _run(["--dump-dom", probe.as_uri()], str(Path(tmp) / "profile"))
    found = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert found, "the page did not finish loading"
    return int(found.group(1)), int(found.group(2))


def screenshot(report: Path, out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        _run([f"--screenshot={out}", report.as_uri()], str(Path(tmp) / "profile"))
    return out
