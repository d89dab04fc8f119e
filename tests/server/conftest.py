import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest


class ServerProcess:
    """A real `paraserve serve` process on 127.0.0.1 and an ephemeral port."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paraserve.server.cli", "serve", *args, "--host", "127.0.0.1",
             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url = self._wait_for_url()
        threading.Thread(target=self._drain, daemon=True).start()
        self._wait_healthy()

    def _wait_for_url(self, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.lines))
            self.lines.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            if m:
                return m.group(1)
        raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def _wait_healthy(self) -> None:
        for _ in range(200):
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server never became healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def start_server():
    servers = []

    def start(*args: str) -> ServerProcess:
        s = ServerProcess(*args)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
