"""Open an HTML file in headless Chromium: the DOM after scripts ran, console messages, and a screenshot.

Used to check that a dashboard loads without console errors and to keep a picture of it. Needs Debian's
``chromium`` package (``apt-get install -y chromium``) or any Chromium / Chrome binary on ``PATH`` (or in
``$CHROMIUM``). One launch does everything:

    chromium --headless --no-sandbox --disable-gpu ... --enable-logging=stderr --v=0
             --window-size=W,H --screenshot=PATH --dump-dom file:///...

The page's console messages (``console.log/error``, uncaught exceptions, failed resource loads) appear in the
browser's stderr as ``INFO:CONSOLE`` lines, which are collected here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_CONSOLE = re.compile(r":CONSOLE[^\]]*\]\s*(.*)$")


class ChromiumNotFound(RuntimeError):
    """No Chromium binary could be found."""


def find_chromium() -> str:
    """Path of a Chromium binary (``$CHROMIUM`` first); raises :class:`ChromiumNotFound` with the fix."""
    explicit = os.environ.get("CHROMIUM")
    if explicit and Path(explicit).exists():
        return explicit
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise ChromiumNotFound(
        "headless Chromium is needed to check the dashboard but none was found on PATH "
        f"(tried {', '.join(CANDIDATES)} and $CHROMIUM). "
        "Install it with: apt-get update && apt-get install -y chromium"
    )


@dataclass
class PageReport:
    """What the browser saw: the serialised DOM, the page's console messages and the screenshot path."""

    dom: str
    console: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    returncode: int = 0
    stderr: str = ""

    def body_attribute(self, name: str) -> str | None:
        match = re.search(r"<body\b[^>]*\b" + re.escape(name) + r'="([^"]*)"', self.dom)
        return match.group(1) if match else None

    def count(self, css_class: str) -> int:
        """Elements whose class attribute contains ``css_class`` (a plain token match on the DOM text)."""
        return len(re.findall(r'class="(?:[^"]*\s)?' + re.escape(css_class) + r'(?:\s[^"]*)?"', self.dom))


def open_page(
    html_path: str | Path,
    screenshot: str | Path | None = None,
    window_size: tuple[int, int] = (1400, 1800),
    timeout: float = 120.0,
    chromium: str | None = None,
) -> PageReport:
    """Load ``html_path`` in headless Chromium; return the DOM, console messages and (optionally) a
    screenshot."""
    binary = chromium or find_chromium()
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="sae_vision_chromium_") as profile:
        command = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            f"--window-size={window_size[0]},{window_size[1]}",
        ]
        if screenshot is not None:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            command.append(f"--screenshot={Path(screenshot).resolve()}")
        command += ["--dump-dom", url]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    console = [m.group(1) for line in completed.stderr.splitlines() if (m := _CONSOLE.search(line))]
    shot = Path(screenshot) if screenshot is not None and Path(screenshot).exists() else None
    return PageReport(
        dom=completed.stdout,
        console=console,
        screenshot=shot,
        returncode=completed.returncode,
        stderr=completed.stderr,
    )
