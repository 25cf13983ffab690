#!/usr/bin/env python
"""Render a report's `report.html` in headless Chromium and save a screenshot.

    python tools/render_report.py REPORT_DIR OUT.png [--width 1400] [--height 0] [--timeout 60]

REPORT_DIR is a report folder (or a report.html itself). The page is opened from disk with a fresh profile and
every network-facing feature off, so the screenshot also shows that the page needs nothing from outside.
With --height 0 (the default) the page is captured whole (up to --max_height): it is rendered in a window taller
than its estimated height and the empty background below the page is trimmed off (with Pillow, when installed). Exit codes: 0 written, 2 bad input, 3 no Chromium, 4 Chromium failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
    "--force-device-scale-factor=1",
]


def find_browser() -> str | None:
    """The Chromium executable: $CHROMIUM if set, else the first of the usual names on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) or Path(explicit).is_file() else None
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def estimate_height(page: str, width: int) -> int:
    """A generous guess at the rendered height of a report page (headless --screenshot has no full-page mode):
    closed <details> hide their tables, so only visible rows count."""
    visible = re.sub(r"<details(?![^>]*\bopen\b)[^>]*>.*?</details>", "<details></details>", page, flags=re.S)
    rows = visible.count("<tr")
    plots = visible.count('<svg class="plot"')
    details = page.count("<details")
    sections = visible.count("<section")
    plot_h = int(min(width, 1280) * 360 / 1200)
    return 420 + rows * 26 + plots * (plot_h + 40) + details * 46 + sections * 190


def trim_bottom(png: Path, margin: int = 24) -> None:
    """Cut the rows of plain background colour below the page's content (needs Pillow; else a no-op)."""
    try:
        from PIL import Image, ImageChops
    except ImportError:
        return
    with Image.open(png) as image:
        image = image.convert("RGB")
        background = image.getpixel((image.width - 1, image.height - 1))
        diff = ImageChops.difference(image, Image.new("RGB", image.size, background)).getbbox()
        if diff is None:
            return
        bottom = min(image.height, diff[3] + margin)
        if bottom < image.height:
            image.crop((0, 0, image.width, bottom)).save(png)


def render(report: Path, out: Path, width: int = 1400, height: int = 0, max_height: int = 16000,
           timeout: float = 60.0, browser: str | None = None) -> Path:
    page = report / "report.html" if report.is_dir() else report
    if not page.is_file():
        raise FileNotFoundError(f"{page} does not exist")
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError("no Chromium found (apt-get install chromium, or set $CHROMIUM)")
    trim = height <= 0
    if trim:
        height = min(max_height, 2 * estimate_height(page.read_text(encoding="utf-8"), width))
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="render-report-profile-")
    partial = out.with_name(f".{out.name}.partial.png")
    try:
        command = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   f"--screenshot={partial}", page.resolve().as_uri()]
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                              text=True, env={**os.environ, "HOME": profile})
        if done.returncode != 0 or not partial.is_file() or partial.stat().st_size == 0:
            raise RuntimeError(f"{Path(browser).name} exited {done.returncode} without a screenshot:\n"
                               f"{done.stdout[-2000:]}")
        if trim:
            trim_bottom(partial)
        os.replace(partial, out)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
        if partial.exists():
            partial.unlink()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path, help="a report folder (or its report.html)")
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=0, help="window height; 0: estimated from the page")
    p.add_argument("--max_height", type=int, default=16000)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for Chromium")
    args = p.parse_args(argv)
    try:
        written = render(args.report, args.out, args.width, args.height, args.max_height, args.timeout)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if "no Chromium" in str(exc) else 4
    except subprocess.TimeoutExpired:
        print(f"error: Chromium did not finish within {args.timeout:g} s", file=sys.stderr)
        return 4
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
