"""Drive a headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe): no websocket
client, no driver binary, just the browser Debian packages. Used by tests/test_server.py to run the chat page, and
by hand to take docs/server-chat.png:

    python tests/cdp_pipe.py http://127.0.0.1:8000/ "def add(a, b):" docs/server-chat.png

Protocol: JSON messages separated by NUL bytes; the browser reads commands on its fd 3 and writes on its fd 4.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def _above(fd: int, lowest: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, lowest)
    os.close(fd)
    return moved


def find_chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


class Chromium:
    """One headless browser with one page; `call(method, **params)` sends a command to the page."""

    def __init__(self, binary: str, width: int = 1000, height: int = 640):
        self.profile = tempfile.mkdtemp(prefix="cdp-")
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # the browser wants the pipe on its fds 3 and 4: a small exec'ing Python puts it there (a preexec_fn is
        # unsafe with threads; dash's redirections take single-digit fds only); the ends move above 4 first, so
        # that neither dup2 overwrites the other end
        to_browser, from_browser = (_above(fd, 10) for fd in (to_browser, from_browser))
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                 f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]
        launch = (f"import os, sys; os.dup2({to_browser}, 3); os.dup2({from_browser}, 4); "
                  "os.execv(sys.argv[1], sys.argv[1:])")
        self.proc = subprocess.Popen([sys.executable, "-c", launch, binary, *flags],
                                     pass_fds=(to_browser, from_browser),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._id = 0
        target = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]

    def send(self, method: str, session: str | None = None, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:  # events in between are not needed here
            reply = self._next()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def call(self, method: str, **params):
        return self.send(method, self.session, **params)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{expression} stayed false for {timeout} s")

    def screenshot(self, path: str) -> None:
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def _next(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError("the browser closed its DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)
        shutil.rmtree(self.profile, ignore_errors=True)


def chat_once(browser: Chromium, url: str, message: str, max_tokens: int = 16) -> str:
    """Open the chat page, send one message, wait for the streamed answer; the answer's text."""
    browser.call("Page.navigate", url=url)
    browser.wait_for("document.getElementById('status') && "
                     "document.getElementById('status').textContent.startsWith('model:')")
    browser.evaluate(f"document.getElementById('max').value = '{int(max_tokens)}';"
                     f"document.getElementById('input').value = {json.dumps(message)};"
                     "document.getElementById('form').requestSubmit();")
    browser.wait_for("document.body.dataset.state === 'idle'")
    return browser.evaluate("document.querySelector('.assistant .text').textContent")


if __name__ == "__main__":
    page_url, text, png = sys.argv[1:4]
    chrome = Chromium(find_chromium())
    try:
        print(chat_once(chrome, page_url, text, max_tokens=48))
        chrome.screenshot(png)
    finally:
        chrome.close()
