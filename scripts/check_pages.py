#!/usr/bin/env python3
"""Render every SVG and HTML page of a hookgraph results directory with headless Chromium.

Usage: scripts/check_pages.py RESULTS_DIR [RESULTS_DIR ...] [--png-dir DIR]

For each `*.svg` and `*.html` it checks, as a person opening the page would notice:
  - the file parses (SVG as XML);
  - an HTML page fetches nothing from the network and every relative link or image it has
    points at a file that exists;
  - Chromium renders it to a PNG (`--screenshot`), and the page writes nothing to the
    console: no "Uncaught ..." error, no message at all. Our pages never log, so any
    console line is a problem. Chromium prints console messages to stderr with
    `--enable-logging=stderr --v=0` as `...:CONSOLE...] "message", source: ...`, which is
    what is matched: no DevTools protocol needed.
The PNGs are kept (default: a new directory under /tmp, printed at the end) to look at.
Exit status 0 when every page passes, 1 otherwise, 2 when Chromium is missing.

Only the Python standard library is used. Chromium: `apt-get install -y chromium`, or set
CHROMIUM to the browser's path.
"""

import argparse
import html.parser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import xml.etree.ElementTree as ET

CONSOLE = re.compile(r":CONSOLE[:(]|Uncaught")
MAX_SIDE = 4000


def chromium():
    for name in [os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def svg_size(path):
    """The SVG's width and height in pixels (capped), from its root element."""
    root = ET.parse(path).getroot()
    def px(attr, default):
        m = re.match(r"\s*([0-9.]+)", root.get(attr, ""))
        return int(float(m.group(1))) if m else default
    return min(px("width", 1200), MAX_SIDE), min(px("height", 800), MAX_SIDE)


class Links(html.parser.HTMLParser):
    """Every URL an HTML page refers to (href, src)."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src") and v:
                self.urls.append((tag, v))


def check_links(path):
    problems = []
    parser = Links()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    parser.feed(text)
    for tag, url in parser.urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme or parts.netloc:
            problems.append(f"<{tag}> fetches {url}: pages must be self-contained")
            continue
        if not parts.path:
            continue
        target = os.path.join(os.path.dirname(path), urllib.parse.unquote(parts.path))
        if not os.path.isfile(target):
            problems.append(f"<{tag}> links {url}, which does not exist")
    if re.search(r"@import|url\(\s*['\"]?https?:", text):
        problems.append("CSS fetches from the network")
    return problems


def render(browser, path, png, size, fragment=""):
    cmd = [
        browser,
        "--headless",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--enable-logging=stderr",
        "--v=0",
        # Lets the page's script run to completion before the screenshot.
        "--virtual-time-budget=3000",
        f"--window-size={size[0]},{size[1]}",
        f"--screenshot={png}",
        "file://" + urllib.parse.quote(os.path.abspath(path)) + fragment,
    ]
    # Chromium's sandbox refuses to run as root (containers, CI).
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    problems = [
        "console: " + line.split("] ", 1)[-1]
        for line in (proc.stdout + proc.stderr).splitlines()
        if CONSOLE.search(line)
    ]
    if proc.returncode != 0:
        problems.append(f"chromium exited with {proc.returncode}: {proc.stderr[-500:]}")
    if not os.path.isfile(png) or os.path.getsize(png) == 0:
        problems.append("no screenshot was written")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="results directories")
    ap.add_argument("--png-dir", help="where the screenshots go (default: a new /tmp dir)")
    args = ap.parse_args()
    browser = chromium()
    if browser is None:
        print("chromium not found: apt-get install -y chromium (or set CHROMIUM)", file=sys.stderr)
        return 2
    png_dir = args.png_dir or tempfile.mkdtemp(prefix="check_pages-")
    os.makedirs(png_dir, exist_ok=True)
    failed = 0
    checked = 0
    for d in args.dirs:
        pages = sorted(f for f in os.listdir(d) if f.endswith((".svg", ".html")))
        if not pages:
            print(f"{d}: no .svg or .html files", file=sys.stderr)
            failed += 1
        for name in pages:
            path = os.path.join(d, name)
            problems = []
            size = (1400, 2000)
            try:
                if name.endswith(".svg"):
                    size = svg_size(path)
                else:
                    problems += check_links(path)
            except (ET.ParseError, UnicodeDecodeError) as e:
                problems.append(f"does not parse: {e}")
            png = os.path.join(png_dir, f"{os.path.basename(os.path.normpath(d))}__{name}.png")
            problems += render(browser, path, png, size)
            # Attention pages take `#head=..&token=..` to open in a hovered state: render
            # that too, so the highlighting code runs and can be looked at.
            if name.startswith("attention_") and name.endswith(".html"):
                hovered = png[: -len(".png")] + "__hover.png"
                problems += render(browser, path, hovered, size, "#head=1&token=last")
            checked += 1
            status = "FAIL" if problems else "ok"
            print(f"{status:4} {path} -> {png} ({size[0]}x{size[1]})")
            for p in problems:
                print(f"     {p}")
            failed += bool(problems)
    print(f"{checked} pages, {failed} failed; screenshots in {png_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
