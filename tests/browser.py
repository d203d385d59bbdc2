"""Headless Chromium for the dashboard test, driven through chromedriver's W3C WebDriver HTTP API.

Why not selenium: the test needs five calls (new session, navigate, run a script, screenshot, quit),
each one JSON request; a dozen lines of urllib do it without another dependency. Chromium and
chromedriver are Debian's packages (``apt-get install chromium chromium-driver``), which ``.ci/run``
installs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness import kill_group, wait_until

CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--window-size=1400,2200",
)


class Browser:
    """One chromedriver process (bound to a free port it reports) and one browser session in it."""

    def __init__(self, timeout: float = 60):
        driver, chromium = shutil.which("chromedriver"), shutil.which("chromium")
        if driver is None or chromium is None:
            raise AssertionError(
                "chromium and chromedriver are needed: apt-get install chromium chromium-driver"
            )
        self.proc = subprocess.Popen(
            [driver, "--port=0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # chromium's processes are in its group: one kill stops them all
        )
        self.output: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            port = wait_until(self._port, timeout, "chromedriver to report its port", interval=0.05)
            self.base = f"http://127.0.0.1:{port}"
            capabilities = {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium, "args": list(CHROMIUM_ARGS)},
            }
            answer = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}}, timeout)
            self.session = f"/session/{answer['sessionId']}"
        except BaseException:
            self.close()
            raise

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def _port(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"chromedriver exited with {self.proc.returncode}: {''.join(self.output)}")
        found = re.search(r"started successfully on port (\d+)", "".join(self.output))
        return int(found.group(1)) if found else None

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.code} {e.read()[:2000]!r}") from None

    def get(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``arguments`` holds ``args``) in the page; its return value."""
        return self._call("POST", f"{self.session}/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self._call("GET", f"{self.session}/screenshot"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return png

    def close(self) -> None:
        if getattr(self, "session", None):
            # the driver's process group is killed below either way
            with contextlib.suppress(AssertionError, OSError):
                self._call("DELETE", self.session, timeout=10)
        kill_group(self.proc.pid)
        self.proc.wait(timeout=10)
