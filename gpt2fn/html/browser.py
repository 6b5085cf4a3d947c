"""Headless Chromium, driven over the DevTools protocol through a pipe: load a view from a file with the network
blocked, read the DOM, hover, take screenshots. Used by the browser tests and `scripts/view_screenshots.py`; it
needs a `chromium` (Debian's package) or `$GPT2FN_CHROMIUM`, and nothing from PyPI.

    with Browser() as b:                   # one browser process; raises BrowserUnavailable without one
        page = b.open("view.html")         # a fresh tab; every non-file request is failed and recorded
        page.evaluate("document.title")
        page.hover(".g2f-tok[data-i='3']")
        png = page.screenshot()            # PNG bytes

Why no library: `--remote-debugging-pipe` speaks NUL-separated JSON on file descriptors 3 and 4, which takes a
few dozen lines; Playwright or pyppeteer would bring a second browser download and a large dependency for that.
Flags: headless, no sandbox (containers run as root), no GPU, no QUIC, no first-run, background networking,
component updates or sync, a fresh `--user-data-dir`, and host resolution mapped to nothing; on top of that the
`Fetch` domain fails every request that is not a `file:` or `data:` URL.
"""

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["Browser", "Page", "BrowserUnavailable", "find_chromium", "FLAGS"]

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
         "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND", "--remote-debugging-pipe")


class BrowserUnavailable(RuntimeError):
    """No Chromium to run (not installed, or it failed to start)."""


def find_chromium() -> str | None:
    """`$GPT2FN_CHROMIUM`, else the first of chromium / chromium-browser / google-chrome on PATH, else None."""
    env = os.environ.get("GPT2FN_CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium process; `open(path)` gives a `Page`. Use as a context manager."""

    def __init__(self, executable: str | None = None, *, timeout: float = 30.0) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise BrowserUnavailable("no chromium found: install Debian's `chromium` package (scripts/setup.sh "
                                     "tries) or set GPT2FN_CHROMIUM to a Chromium/Chrome binary")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="gpt2fn-chromium-")
        self._log = open(os.path.join(self._profile, "stderr.log"), "wb")  # a file: a full pipe would block it
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child's ends move above 9, so that placing them at 3 and 4 cannot clobber one another
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w)]
        os.close(to_child_r)
        os.close(from_child_w)
        to_child_r, from_child_w = high
        # the child reads commands on fd 3 and writes replies on fd 4: dup2 places them there after the fork
        # (inheritable, unlike every other descriptor Python opens, so close_fds=False passes only these two)
        def place() -> None:
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        try:
            self._proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                                          preexec_fn=place, close_fds=False, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=self._log)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []
        try:
            self.send("Browser.getVersion")
        except Exception as exc:
            self.close()
            raise BrowserUnavailable(f"chromium ({exe}) did not start: {exc}") from None

    # -- protocol ------------------------------------------------------------------------------------------------

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from chromium")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    err = Path(self._log.name).read_bytes().decode(errors="replace")[-2000:]
                    raise BrowserUnavailable(f"chromium closed the pipe; stderr: {err}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None) -> Any:
        """Send one command and wait for its result (events arriving meanwhile go to `self.events`)."""
        self._next += 1
        ident = self._next
        msg: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._event(reply)

    def _event(self, msg: dict[str, Any]) -> None:
        if msg.get("method") == "Fetch.requestPaused":
            p = msg["params"]
            url = p["request"]["url"]
            if url.startswith(("file:", "data:")):
                self._post("Fetch.continueRequest", {"requestId": p["requestId"]}, msg.get("sessionId"))
            else:
                self._post("Fetch.failRequest", {"requestId": p["requestId"], "errorReason": "BlockedByClient"},
                           msg.get("sessionId"))
        self.events.append(msg)

    def _post(self, method: str, params: dict[str, Any], session: str | None) -> None:
        """A command whose reply is not awaited (replies without a waiting caller are dropped as events)."""
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")

    def pump(self, seconds: float) -> None:
        """Handle events for `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                self._event(self._read(deadline))
            except TimeoutError:
                return

    def open(self, path: str | os.PathLike[str], *, width: int = 1280, height: int = 900) -> "Page":
        """A new tab with `path` loaded (a local file), once its load event fired."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Fetch.enable", {"patterns": [{"urlPattern": "*"}]}, session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        page.start = len(self.events)
        self.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
        page.wait_event("Page.loadEventFired")
        return page

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            try:
                self._post("Browser.close", {}, None)
                proc.wait(5)
            except Exception:
                proc.kill()
                proc.wait()
        for fd in (getattr(self, "_to_child", None), getattr(self, "_from_child", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._to_child = self._from_child = None
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Page:
    """One tab of a `Browser`: evaluate, hover, screenshot, and what it logged."""

    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser, self.target, self.session = browser, target, session
        self.start = len(browser.events)

    def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.browser.send(method, params, session=self.session)

    def events(self, method: str | None = None) -> list[dict[str, Any]]:
        """This tab's protocol events so far (of one `method`, if given)."""
        return [e for e in self.browser.events[self.start:] if e.get("sessionId") == self.session
                and (method is None or e.get("method") == method)]

    def wait_event(self, method: str, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout or self.browser.timeout)
        while True:
            found = self.events(method)
            if found:
                return found[0]
            self.browser._event(self.browser._read(deadline))

    def evaluate(self, expression: str) -> Any:
        """`expression`'s value (promises awaited); a thrown exception raises RuntimeError."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression!r} threw: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Poll `expression` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} stayed falsy for {timeout} s")
            self.browser.pump(0.05)

    def hover(self, selector: str) -> None:
        """Scroll the first element matching `selector` into view and move the mouse to its centre (a real pointer
        event, as a person's hover)."""
        box = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                            "e.scrollIntoView({block: 'center', inline: 'center'}); "
                            "const r = e.getBoundingClientRect(); "
                            "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": box[0], "y": box[1]})
        self.browser.pump(0.05)

    def screenshot(self, *, full_page: bool = True) -> bytes:
        """PNG bytes of the page (the whole document with `full_page`)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": size["width"],
                                                            "height": size["height"], "scale": 1})
        return base64.b64decode(self.send("Page.captureScreenshot", params)["data"])

    def console(self) -> list[str]:
        """Console messages, uncaught exceptions and log entries (errors and warnings) of this tab."""
        out = []
        for e in self.events("Runtime.consoleAPICalled"):
            p = e["params"]
            out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description"))) for a in
                                                           p.get("args", [])))
        for e in self.events("Runtime.exceptionThrown"):
            out.append(f"exception: {e['params']['exceptionDetails']}")
        for e in self.events("Log.entryAdded"):
            entry = e["params"]["entry"]
            if entry.get("level") in ("error", "warning"):
                out.append(f"log.{entry['level']}: {entry.get('text')} {entry.get('url', '')}")
        return out

    def dialogs(self) -> list[str]:
        """Messages of JavaScript dialogs (`alert`, ...) the page opened."""
        return [e["params"].get("message", "") for e in self.events("Page.javascriptDialogOpening")]

    def blocked(self) -> list[str]:
        """URLs of network requests the page tried (and that were failed)."""
        return [e["params"]["request"]["url"] for e in self.events("Fetch.requestPaused")
                if not e["params"]["request"]["url"].startswith(("file:", "data:"))]

    def close(self) -> None:
        self.browser.send("Target.closeTarget", {"targetId": self.target})
