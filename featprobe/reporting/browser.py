"""Look at a report the way a person would: headless Chromium over the DevTools protocol, with
no Python dependency beyond the standard library.

``--remote-debugging-pipe`` gives Chromium's protocol on file descriptors 3 (commands in) and 4
(replies and events out), NUL-separated JSON. :func:`render` opens a page, collects console
messages, uncaught exceptions, log entries and every network request it makes, and takes a
screenshot. ``python -m featprobe.reporting.browser REPORT.html --screenshot PNG`` makes the
README's picture (docs/report.md)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """A Chromium executable: ``$CHROMIUM`` or the first of :data:`NAMES` on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((p for p in map(shutil.which, NAMES) if p), None)


@dataclass
class Rendered:
    """What the browser saw: console errors, exceptions, requests beyond the page itself, the
    screenshot (PNG bytes) and values read from the page with ``evaluate``."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    screenshot: bytes = b""
    values: dict = field(default_factory=dict)


class _Pipe:
    """One Chromium process and its protocol pipe: ``call`` sends a command and waits for its
    reply; every event seen meanwhile lands in ``events``."""

    def __init__(self, chromium: str, profile: str, width: int, height: int):
        to_child, from_child = os.pipe(), os.pipe()  # not inheritable: closed at exec
        args = [chromium, "--headless", "--remote-debugging-pipe", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--hide-scrollbars", "--mute-audio",
                f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to sandbox as root

        def fds():  # in the child: our pipe ends become its (inheritable) fds 3 and 4
            os.dup2(to_child[0], 100)
            os.dup2(from_child[1], 101)
            os.dup2(100, 3)
            os.dup2(101, 4)
            os.close(100)
            os.close(101)

        # close_fds=False: fds 3 and 4 are made after the child's usual closing would run;
        # every other fd of ours is close-on-exec (PEP 446), so nothing else leaks
        self.proc = subprocess.Popen(args + ["about:blank"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=fds, close_fds=False)
        os.close(to_child[0])
        os.close(from_child[1])
        self._out, self._in = to_child[1], from_child[0]
        self.events: list[dict] = []
        self._replies: queue.Queue = queue.Queue()
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._in, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for m in messages:
                msg = json.loads(m)
                if "id" in msg:
                    self._replies.put(msg)
                else:
                    self.events.append(msg)
        self._replies.put(None)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._replies.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply is None:
                raise RuntimeError(f"Chromium exited during {method}")
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout:.0f}s")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, OSError, queue.Empty):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._out, self._in):
            try:
                os.close(fd)
            except OSError:
                pass


def render(page: str | os.PathLike, chromium: str | None = None, width: int = 1280,
           height: int = 1600, dark: bool = False, evaluate: dict[str, str] | None = None,
           timeout: float = 60.0) -> Rendered:
    """Open ``page`` (an HTML file) in headless Chromium; return what it logged and requested,
    a full-width screenshot of the first ``height`` pixels, and the value of each JavaScript
    expression in ``evaluate`` (after load). ``dark`` emulates ``prefers-color-scheme: dark``."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("Chromium not found (apt-get install chromium, or set $CHROMIUM)")
    url = Path(page).resolve().as_uri()
    out = Rendered()
    with tempfile.TemporaryDirectory(prefix="featprobe-chromium-") as profile:
        pipe = _Pipe(chromium, profile, width, height)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)
            session = pipe.call("Target.attachToTarget", {"targetId": target["targetId"],
                                                          "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                pipe.call(f"{domain}.enable", session=session)
            pipe.call("Emulation.setDeviceMetricsOverride", {
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session=session)
            pipe.call("Emulation.setEmulatedMedia", {"features": [
                {"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]},
                session=session)
            pipe.call("Page.navigate", {"url": url}, session=session)
            pipe.wait_event("Page.loadEventFired", timeout)
            for name, expression in (evaluate or {}).items():
                value = pipe.call("Runtime.evaluate", {"expression": expression,
                                                       "returnByValue": True}, session=session)
                out.values[name] = value.get("result", {}).get("value")
            time.sleep(0.3)  # late console messages and requests
            shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)
            out.screenshot = base64.b64decode(shot["data"])
        finally:
            pipe.close()
    for e in pipe.events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert",
                                                                       "warning"):
            out.errors.append(" ".join(str(a.get("value", a.get("description")))
                                       for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = p.get("exceptionDetails", {})
            out.errors.append(details.get("exception", {}).get("description")
                              or details.get("text", "exception"))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error",
                                                                               "warning"):
            out.errors.append(p["entry"].get("text", ""))
        elif method == "Network.requestWillBeSent":
            req = p.get("request", {}).get("url", "")
            if req != url and not req.startswith("data:"):
                out.requests.append(req)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m featprobe.reporting.browser",
                                 description="Render a report in headless Chromium: print its "
                                 "console errors and network requests, save a screenshot.")
    ap.add_argument("page", type=Path, help="the report's HTML file")
    ap.add_argument("--screenshot", type=Path, help="PNG to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1600)
    ap.add_argument("--dark", action="store_true", help="prefers-color-scheme: dark")
    args = ap.parse_args(argv)
    if not args.page.is_file():
        print(f"error: {args.page}: no such file", file=sys.stderr)
        return 2
    try:
        seen = render(args.page, width=args.width, height=args.height, dark=args.dark)
    except (FileNotFoundError, RuntimeError, TimeoutError, queue.Empty) as e:
        print(f"error: {e or 'Chromium did not answer'}", file=sys.stderr)
        return 2
    for line in seen.errors:
        print(f"console: {line}")
    for line in seen.requests:
        print(f"request: {line}")
    if args.screenshot:
        args.screenshot.write_bytes(seen.screenshot)
        print(args.screenshot)
    return 1 if seen.errors or seen.requests else 0


if __name__ == "__main__":
    sys.exit(main())
