"""The demo report in a real browser: every image loads, every internal link resolves, no console errors.

Headless Chromium is driven over the DevTools protocol on `--remote-debugging-pipe` (file
descriptors 3 and 4, NUL-separated JSON; standard library only, no new dependency): the
page is loaded from file://, a checker script runs in it (images: `naturalWidth > 0` after
each finished loading; links: same-page `#anchors` against element ids), Python checks that
relative links name existing files (and ids in them), and every console error, uncaught
exception and failed resource load the browser logs is collected. A screenshot is written
to the test's tmp dir.

Without Chromium the tests skip, unless CI is set (CI=true): then they fail, since `.ci/run`
installs Debian's `chromium`. The checker is itself tested on a hand-made page with a
missing image, dead links and a console error.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEMO_VARIANTS = ("shapes_vit_p16", "shapes_vit_p16@random")
LOAD_TIMEOUT_S = 60

# Runs in the page once it has loaded: waits for every image to finish (load or error), then
# reports images, links and same-page anchors as JSON.
CHECKER = r"""
(async () => {
  const images = Array.from(document.images);
  for (const img of images) { if (img.loading === 'lazy') img.loading = 'eager'; }
  await Promise.all(images.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener('load', done, {once: true});
    img.addEventListener('error', done, {once: true});
    setTimeout(done, 20000);
  })));
  const links = Array.from(document.querySelectorAll('a[href], link[href], area[href]')).map(a => {
    const raw = a.getAttribute('href');
    const url = new URL(raw, document.baseURI);
    const samePage = url.href.split('#')[0] === document.baseURI.split('#')[0];
    const id = url.hash ? decodeURIComponent(url.hash.slice(1)) : '';
    return {raw: raw, url: url.href, same_page: samePage, id: id,
            id_found: samePage && id ? document.getElementById(id) !== null : null};
  });
  return JSON.stringify({
    title: document.title,
    images: images.map(img => ({src: img.getAttribute('src'), url: img.currentSrc || img.src,
                                complete: img.complete, natural_width: img.naturalWidth})),
    links: links,
  });
})()
"""


def find_chromium() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI is set but no Chromium is installed (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium); CI=true makes this a failure")
    return path


def _high_fd(fd: int) -> int:
    """`fd` moved to a descriptor number >= 10 (the original is closed)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class DevTools:
    """A headless Chromium spoken to over --remote-debugging-pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, binary: str, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Above fd 9, so that moving them onto 3 and 4 cannot overwrite one another.
        to_browser_r, from_browser_w = (_high_fd(fd) for fd in (to_browser_r, from_browser_w))
        # The browser expects the pipe on fds 3 and 4 exactly: bash moves them there before exec.
        shell = f'exec 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-; exec "$@"'
        args = [binary, "--headless=new", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--hide-scrollbars", "--window-size=1280,1600", "about:blank"]
        self.process = subprocess.Popen(["bash", "-c", shell, "bash", *args], pass_fds=(to_browser_r, from_browser_w),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self._replies: dict[int, dict] = {}
        threading.Thread(target=self._read, daemon=True).start()
        self._stderr: list[str] = []
        threading.Thread(target=lambda: self._stderr.extend(self.process.stderr), daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                self._messages.put(None)
                return
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                self._messages.put(json.loads(message))

    def _pump(self, deadline: float) -> None:
        message = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
        if message is None:
            raise RuntimeError("chromium closed the DevTools pipe: " + "".join(self._stderr)[-2000:])
        if "id" in message:
            self._replies[message["id"]] = message
        else:
            self.events.append(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = LOAD_TIMEOUT_S) -> dict:
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = session
        os.write(self._to_browser, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while self._next_id not in self._replies:
            self._pump(deadline)
        reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_for_event(self, method: str, session: str, timeout: float = LOAD_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event["method"] == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self._pump(deadline)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)


@dataclass
class PageCheck:
    """What the browser found on one page."""

    title: str
    images: list[dict]
    links: list[dict]
    console_errors: list[str]
    broken_images: list[str] = field(default_factory=list)
    dead_links: list[str] = field(default_factory=list)


def _console_errors(events: list[dict]) -> list[str]:
    errors = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
    return errors


def _dead_file_link(link: dict) -> str | None:
    """Why a link to another local file is dead (None when it resolves or is not a local file)."""
    url = urlparse(link["url"])
    if url.scheme != "file":
        return None  # http(s), mailto: not internal
    target = Path(unquote(url.path))
    if not target.is_file():
        return f"{link['raw']}: no file {target}"
    if link["id"] and target.suffix in (".html", ".htm"):
        ids = re.findall(r"""\bid\s*=\s*["']?([^"'\s>]+)""", target.read_text(encoding="utf-8", errors="replace"))
        if link["id"] not in ids:
            return f"{link['raw']}: no element id {link['id']!r} in {target.name}"
    return None


def check_page(binary: str, page: Path, screenshot: Path, profile: Path) -> PageCheck:
    """Open `page` in headless Chromium; collect images, links and console errors; write a PNG screenshot."""
    browser = DevTools(binary, profile)
    try:
        targets = browser.send("Target.getTargets")["targetInfos"]
        target = next(t["targetId"] for t in targets if t["type"] == "page")
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_for_event("Page.loadEventFired", session)
        result = browser.send("Runtime.evaluate", {"expression": CHECKER, "awaitPromise": True,
                                                   "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"checker script failed: {result['exceptionDetails']}")
        found = json.loads(result["result"]["value"])
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        time.sleep(0.2)  # let late log entries arrive
        browser.send("Runtime.evaluate", {"expression": "1"}, session=session)
        check = PageCheck(found["title"], found["images"], found["links"], _console_errors(browser.events))
    finally:
        browser.close()
    check.broken_images = [f"{i['src']} (complete={i['complete']}, naturalWidth={i['natural_width']})"
                           for i in check.images if not (i["complete"] and i["natural_width"] > 0)]
    for link in check.links:
        if link["same_page"]:
            if link["id"] and not link["id_found"]:
                check.dead_links.append(f"{link['raw']}: no element with id {link['id']!r}")
        else:
            reason = _dead_file_link(link)
            if reason:
                check.dead_links.append(reason)
    return check


# --- the checker can fail ---------------------------------------------------------------------

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def _hand_made_page(folder: Path, broken: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "figures").mkdir(exist_ok=True)
    (folder / "figures" / "ok.png").write_bytes(PNG_1PX)
    (folder / "tables").mkdir(exist_ok=True)
    (folder / "tables" / "t.csv").write_text("a,b\n1,2\n")
    bad = ("<img src='figures/missing.png' alt='missing'>"
           "<a href='tables/missing.csv'>dead file</a> <a href='#nowhere'>dead anchor</a>"
           "<script>console.error('boom from the page')</script>") if broken else ""
    page = folder / "index.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><title>hand-made</title></head><body>"
                    "<h1 id='top'>hand-made</h1><img src='figures/ok.png' alt='ok'>"
                    "<a href='tables/t.csv'>table</a> <a href='#top'>top</a> <a href='https://example.org/'>out</a>"
                    + bad + "</body></html>", encoding="utf-8")
    return page


def test_checker_passes_a_good_page(chromium: str, tmp_path: Path):
    check = check_page(chromium, _hand_made_page(tmp_path / "good", broken=False), tmp_path / "good.png",
                       tmp_path / "profile")
    assert check.title == "hand-made"
    assert len(check.images) == 1 and check.broken_images == []
    assert len(check.links) == 3 and check.dead_links == []
    assert check.console_errors == []
    assert (tmp_path / "good.png").read_bytes().startswith(b"\x89PNG")


def test_checker_finds_a_missing_image_dead_links_and_console_errors(chromium: str, tmp_path: Path):
    check = check_page(chromium, _hand_made_page(tmp_path / "bad", broken=True), tmp_path / "bad.png",
                       tmp_path / "profile")
    assert [b.split(" ")[0] for b in check.broken_images] == ["figures/missing.png"]
    assert sorted(d.split(":")[0] for d in check.dead_links) == ["#nowhere", "tables/missing.csv"]
    assert any("boom from the page" in e for e in check.console_errors), check.console_errors
    assert any("missing.png" in e for e in check.console_errors), check.console_errors  # the failed load


# --- the demo report --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_report(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vitlens.cli import main as cli_main

    out = tmp_path_factory.mktemp("demo")
    start = time.monotonic()
    try:
        code = cli_main(["demo", "--out", str(out), "--variants", *DEMO_VARIANTS, "--no-progress"])
    finally:
        import ray

        ray.shutdown()  # the demo started a local cluster in this process; later tests start their own
    seconds = time.monotonic() - start
    (out / "demo_seconds.txt").write_text(f"{seconds:.1f}\n")
    print(f"\nvitlens demo --variants {' '.join(DEMO_VARIANTS)}: {seconds:.1f} s")
    assert code == 0
    return out / "report"


def test_demo_report_in_the_browser(chromium: str, demo_report: Path, tmp_path: Path):
    page = demo_report / "index.html"
    assert page.is_file()
    screenshot = tmp_path / "report.png"
    check = check_page(chromium, page, screenshot, tmp_path / "profile")
    assert check.images, "the report shows no image"
    assert check.broken_images == [], check.broken_images
    assert check.dead_links == [], check.dead_links
    assert check.console_errors == [], check.console_errors
    internal = [link for link in check.links if link["same_page"] or link["url"].startswith("file:")]
    assert internal, "the report has no internal link"
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
