"""Open a run report in real headless Chromium, take a screenshot, and check the rendered page.

    python scripts/check_report.py REPORT.html --screenshot out.png [--expect-plots N]

Checks the DOM as Chromium built it: a plot figure with an <svg> per curve group, the policy-vs-reference
metrics table, the largest/smallest margin pair tables, and nothing that would load from the network (no
http(s) src/href, no <link>, no <script src>, no CSS url(http...)). Chromium's network log is read as well:
any http(s) request made on behalf of the page is a failure. Exits 1 when something is missing or fetched.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
WINDOW_SIZE = "1280,2400"
REQUIRED_TABLES = ("metrics", "pairs-largest", "pairs-smallest")
_REMOTE = re.compile(r"^\s*(?:https?:)?//", re.I)
_CSS_REMOTE = re.compile(r"url\(\s*['\"]?\s*(?:https?:)?//|@import", re.I)
_URL_ATTRS = {"src", "href", "xlink:href", "srcset", "poster", "data", "action", "background"}


@dataclass
class PageParts:
    """What the rendered DOM holds."""

    plots: list[tuple[str, int]] = field(default_factory=list)  # (group, <svg> elements inside) per figure.plot
    tables: dict[str, int] = field(default_factory=dict)  # table id -> body rows
    remote_refs: list[str] = field(default_factory=list)  # things that would load from the network
    win_rate: str | None = None


class _DomReader(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = PageParts()
        self._stack: list[str] = []
        self._plot: int | None = None  # index in parts.plots of the figure we are inside, and its depth
        self._plot_depth = 0
        self._table: str | None = None
        self._in_style = False
        self._in_big = False

    def handle_starttag(self, tag, attrs):
        attributes = {name.lower(): value or "" for name, value in attrs}
        classes = attributes.get("class", "").split()
        self._check_remote(tag, attributes)
        if tag == "figure" and "plot" in classes:
            self.parts.plots.append((attributes.get("data-group", "?"), 0))
            self._plot, self._plot_depth = len(self.parts.plots) - 1, len(self._stack)
        elif tag == "svg" and self._plot is not None:
            group, count = self.parts.plots[self._plot]
            self.parts.plots[self._plot] = (group, count + 1)
        elif tag == "table" and attributes.get("id"):
            self._table = attributes["id"]
            self.parts.tables[self._table] = 0
        elif tag == "tr" and self._table is not None and "tbody" in self._stack:
            self.parts.tables[self._table] += 1
        elif tag == "span" and "big" in classes:
            self._in_big = True
        self._in_style = tag == "style"
        if tag not in ("meta", "br", "img", "input", "col", "hr", "link", "source", "wbr"):
            self._stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if self._stack and self._stack[-1] == tag:
            self._stack.pop()

    def handle_endtag(self, tag):
        if tag in self._stack:
            while self._stack and self._stack.pop() != tag:
                pass
        if tag == "figure" and self._plot is not None and len(self._stack) <= self._plot_depth:
            self._plot = None
        elif tag == "table":
            self._table = None
        elif tag == "style":
            self._in_style = False
        elif tag == "span":
            self._in_big = False

    def handle_data(self, data):
        if self._in_style and _CSS_REMOTE.search(data):
            self.parts.remote_refs.append(f"<style>: {_CSS_REMOTE.search(data).group(0)}")
        if self._in_big and data.strip():
            self.parts.win_rate = data.strip()

    def _check_remote(self, tag, attributes):
        if tag == "link":  # any <link>: a self-contained page has no stylesheet, icon or font to link
            self.parts.remote_refs.append(f"<link href={attributes.get('href', '')!r}>")
            return
        if tag == "script" and "src" in attributes:
            self.parts.remote_refs.append(f"<script src={attributes['src']!r}>")
            return
        for name, value in attributes.items():
            if name in _URL_ATTRS and _REMOTE.search(value):
                self.parts.remote_refs.append(f"<{tag} {name}={value!r}>")
            if name == "style" and _CSS_REMOTE.search(value):
                self.parts.remote_refs.append(f"<{tag} style=...{_CSS_REMOTE.search(value).group(0)}>")


def read_dom(dom: str) -> PageParts:
    reader = _DomReader()
    reader.feed(dom)
    reader.close()
    return reader.parts


def run_chromium(page: Path, *extra: str, chromium: Path = CHROMIUM, timeout: float = 120) -> str:
    """Run headless Chromium on a local page with a fresh profile; its stdout (the DOM with --dump-dom)."""
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        command = [str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, Path(page).resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def page_requests(net_log: Path) -> list[str] | None:
    """http(s) URLs Chromium requested for the page (its requests are keyed to the file:// site), from a
    --log-net-log file; Chromium's own background requests are not the page's and are left out. None when
    the log cannot be read."""
    try:
        log = json.loads(net_log.read_text(encoding="utf-8"))
        start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    except (OSError, ValueError, KeyError):
        return None
    urls = []
    for event in log.get("events", []):
        params = event.get("params") or {}
        url, isolation = str(params.get("url", "")), str(params.get("network_isolation_key", ""))
        if event.get("type") == start_job and "file://" in isolation and re.match(r"(?i)https?:", url):
            urls.append(url)
    return sorted(set(urls))


def png_size(path: Path) -> tuple[int, int]:
    header = Path(path).read_bytes()[:24]
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", header[16:24])


@dataclass
class CheckResult:
    parts: PageParts
    requests: list[str] | None
    screenshot: Path | None
    problems: list[str]

    def summary(self) -> str:
        lines = [
            f"plots: {len(self.parts.plots)} "
            + ("(" + ", ".join(f"{group}: {n} svg" for group, n in self.parts.plots) + ")" if self.parts.plots else "")
        ]
        lines += [f"table #{name}: {rows} rows" for name, rows in sorted(self.parts.tables.items())]
        lines.append(f"win rate shown: {self.parts.win_rate or 'no'}")
        lines.append("remote references in the DOM: " + (", ".join(self.parts.remote_refs) or "none"))
        lines.append(
            "http(s) requests made for the page: "
            + ("unknown (network log unreadable)" if self.requests is None else ", ".join(self.requests) or "none")
        )
        if self.screenshot is not None:
            width, height = png_size(self.screenshot)
            lines.append(f"screenshot: {self.screenshot} ({width}x{height})")
        lines += [f"PROBLEM: {problem}" for problem in self.problems] or ["OK"]
        return "\n".join(lines)


def check_report(
    page: Path, screenshot: Path | None = None, expect_plots: int | None = None, chromium: Path = CHROMIUM
) -> CheckResult:
    """Render `page` in headless Chromium (DOM dump + network log, then a screenshot) and check what it holds."""
    with tempfile.TemporaryDirectory(prefix="report-netlog-") as scratch:
        net_log = Path(scratch) / "net.json"
        dom = run_chromium(page, "--dump-dom", f"--log-net-log={net_log}", chromium=chromium)
        requests = page_requests(net_log)
    parts = read_dom(dom)
    problems = []
    if not parts.plots and "No training curves were logged" not in dom:
        problems.append("no plot figures and no 'no training curves' sentence")
    problems += [f"plot {group!r} has {n} <svg> elements, expected 1" for group, n in parts.plots if n != 1]
    if expect_plots is not None and len(parts.plots) != expect_plots:
        problems.append(f"{len(parts.plots)} plots, expected {expect_plots}")
    problems += [f"table #{name} missing" for name in REQUIRED_TABLES if name not in parts.tables]
    problems += [f"table #{name} is empty" for name in REQUIRED_TABLES if parts.tables.get(name) == 0]
    problems += [f"remote reference: {ref}" for ref in parts.remote_refs]
    problems += [f"network request: {url}" for url in requests or []]
    if screenshot is not None:
        screenshot = Path(screenshot).resolve()
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.unlink(missing_ok=True)
        run_chromium(
            page, f"--screenshot={screenshot}", f"--window-size={WINDOW_SIZE}", "--hide-scrollbars", chromium=chromium
        )
        if not screenshot.is_file() or screenshot.stat().st_size == 0:
            problems.append(f"chromium wrote no screenshot to {screenshot}")
            screenshot = None
    return CheckResult(parts=parts, requests=requests, screenshot=screenshot, problems=problems)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the HTML report to open")
    parser.add_argument("--screenshot", type=Path, help="write a PNG of the page here")
    parser.add_argument("--expect-plots", type=int, help="the number of plot groups the page must hold")
    parser.add_argument("--chromium", type=Path, default=CHROMIUM)
    args = parser.parse_args(argv)
    if not args.report.is_file():
        parser.error(f"{args.report}: no such file")
    if not args.chromium.exists():
        parser.error(f"{args.chromium} not found (Debian: apt-get install chromium)")
    result = check_report(args.report, args.screenshot, args.expect_plots, args.chromium)
    print(result.summary())
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
