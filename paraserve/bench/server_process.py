"""A real `paraserve serve` child process on 127.0.0.1 and a port the OS picks (--port 0): the
benchmark reads the URL the server prints, so no port is ever hard-coded."""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional

_URL = re.compile(r"at (http://127\.0\.0\.1:\d+)")
_LOADED = re.compile(r"loaded .+ \((\w+), ([\w:]+)\) in")  # the worker's "loaded NAME (dtype, device)"


def serve_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags the user gave the benchmark, as `paraserve serve` flags (defaults omitted)."""
    from paraserve.config import engine_fields

    out: list[str] = []
    for f in engine_fields():
        value = getattr(args, f.name, f.default)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


def _libc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL("libc.so.6") if sys.platform == "linux" else None
    except OSError:
        return None


_LIBC = _libc()  # loaded before any fork: the child below must not import or lock anything


def _stop_with_parent() -> None:
    """Runs in the server's process between fork and exec: SIGTERM (the server's graceful
    shutdown) when the benchmark process dies (PR_SET_PDEATHSIG)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)


class ServerProcess:
    def __init__(self, flags: list[str], start_timeout: float = 600.0) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paraserve.server.cli", "serve", *flags,
             "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            # a benchmark stopped by a signal that runs no cleanup (SIGTERM, SIGKILL) still takes
            # its server down: SIGTERM is the server's graceful shutdown
            preexec_fn=_stop_with_parent if _LIBC is not None else None)
        self.lines: list[str] = []
        self.dtype: Optional[str] = None
        try:
            self.url = self._wait_for_url(start_timeout)
            # keep reading, or a full pipe would block the server's logging
            threading.Thread(target=self._drain, daemon=True).start()
            wait_healthy(self.url, is_alive=lambda: self.proc.poll() is None)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}\n{self.log_tail()}") from None
        except BaseException:
            self.stop()
            raise

    def _read_line(self) -> str:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line:
            self.lines.append(line)
            m = _LOADED.search(line)
            if m:
                self.dtype = m.group(1)
        return line

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self._read_line()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("`paraserve serve` exited before serving")
            m = _URL.search(line)
            if m:
                return m.group(1)
        raise RuntimeError(f"`paraserve serve` did not print its URL within {timeout:.0f} s")

    def _drain(self) -> None:
        while self._read_line():
            pass

    def log_tail(self, n: int = 20) -> str:
        return "".join(self.lines[-n:])

    def stop(self) -> None:
        """SIGINT is the server's graceful shutdown; kill only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_healthy(url: str, is_alive: Any = lambda: True, timeout: float = 60.0) -> None:
    """The URL is printed just before the HTTP loop starts; /health answers once it has."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_alive():
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server at {url} did not become healthy")
