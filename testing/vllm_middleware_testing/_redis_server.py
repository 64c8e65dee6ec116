"""A throwaway ``redis-server`` process for tests, with fault injection (kill, pause, restart)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_HOST = "127.0.0.1"
_LOG_NAME = "redis.log"
_STDERR_NAME = "redis.stderr"
_PORT_ATTEMPTS = 5


class RedisServerError(RuntimeError):
    """redis-server is missing, did not start, or did not answer in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _kill_quietly(process: subprocess.Popen[bytes]) -> None:
    # Runs at garbage collection or interpreter exit so no redis-server outlives the tests.
    if process.poll() is None:
        with contextlib.suppress(OSError):
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


class RedisServerProcess:
    """Spawn ``redis-server`` on 127.0.0.1; the port and data dir survive restarts.

    ``stop()`` keeps the data directory (so ``start()`` again reloads an AOF); leaving the
    context manager also deletes the directory when this object created it.
    """

    def __init__(
        self,
        tmp_dir: Path | None = None,
        port: int | None = None,
        appendonly: bool = False,
        maxmemory: str | None = None,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        executable: str | None = None,
    ) -> None:
        self._owns_dir = tmp_dir is None
        self.dir = (
            Path(tmp_dir) if tmp_dir is not None else Path(tempfile.mkdtemp(prefix="redis-test-"))
        )
        # The port is chosen now so ``url`` works before start() (tests of "Redis down at
        # startup" hand the URL to a client first) and stays the same across restarts.
        self._may_move_port = port is None
        self._port = port if port is not None else _free_port()
        self.appendonly = appendonly
        self.maxmemory = maxmemory
        self.password = password
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.executable = executable
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], RedisServerProcess] | None = (
            None
        )
        self._paused = False

    # Addresses ------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return _HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}{_HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / _LOG_NAME

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    # Lifecycle --------------------------------------------------------------------------------

    def start(self) -> RedisServerProcess:
        """Spawn redis-server and wait until it answers PING (AOF loading included)."""
        if self.running:
            return self
        binary = self.executable or shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(
                "redis-server not found on PATH; install it (e.g. `apt-get install redis-server`)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._spawn(binary)
            except RedisServerError as error:
                # The probed port can be taken by someone else before redis binds it; move
                # only if nobody has seen the server run on it yet.
                in_use = "Address already in use" in str(error)
                if not (in_use and self._may_move_port) or attempt == _PORT_ATTEMPTS - 1:
                    raise
                self._port = _free_port()
            else:
                self._may_move_port = False
                return self
        return self  # pragma: no cover - the loop always returns or raises

    def _command(self, binary: str) -> list[str]:
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            _HOST,
            "--dir",
            str(self.dir),
            "--logfile",
            _LOG_NAME,
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
        ]
        if self.appendonly:
            # Fault tests SIGKILL the server and expect every acknowledged write back;
            # the default fsync-every-second would lose the last second. extra_args may override.
            args += ["--appendfsync", "always"]
        if self.maxmemory is not None:
            args += ["--maxmemory", self.maxmemory]
        if self.password is not None:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        return args

    def _spawn(self, binary: str) -> None:
        with open(self.dir / _STDERR_NAME, "ab") as stderr:
            process = subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.dir,
            )
        self._process = process
        self._paused = False
        self._finalizer = weakref.finalize(self, _kill_quietly, process)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                raise RedisServerError(
                    f"redis-server exited with {process.returncode}: {self._log_tail()}"
                )
            # INFO is answered while the AOF is still loading (PING is not): ours is up only
            # when it owns the port and has finished loading.
            if self._answering_pid(timeout=0.5) == process.pid and self.ping(timeout=0.5):
                return
            # Another server owns the port (ours will fail to bind): keep polling until ours
            # exits, so the error carries its log rather than a misleading success.
            time.sleep(0.02)
        _kill_quietly(process)
        self._process = None
        raise RedisServerError(
            f"redis-server did not answer PING within {self.startup_timeout}s: {self._log_tail()}"
        )

    def _log_tail(self) -> str:
        texts = []
        for name in (_STDERR_NAME, _LOG_NAME):
            with contextlib.suppress(OSError):
                texts.append((self.dir / name).read_text(errors="replace")[-2000:])
        return "\n".join(text for text in texts if text.strip()) or "(no log output)"

    def _client(self, timeout: float) -> redis.Redis:
        # A fresh connection per probe, no retries: a probe answers "up now?", never waits.
        return redis.Redis(
            host=_HOST,
            port=self._port,
            password=self.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            lib_name=None,  # no CLIENT SETINFO: one command per probe, answered while loading
            lib_version=None,
        )

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers PING with PONG (False while loading, paused or down)."""
        client = self._client(timeout)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _answering_pid(self, timeout: float) -> int | None:
        client = self._client(timeout)
        try:
            info = client.info("server")
        except redis.RedisError:
            return None
        finally:
            client.close()
        pid = info.get("process_id")
        return pid if isinstance(pid, int) else None

    def _signal(self, signum: int) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._process.pid, signum)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful SIGTERM shutdown (flushes the AOF); SIGKILL if it takes too long."""
        process = self._process
        if process is None:
            return
        if self._paused:
            self.resume()  # a stopped process cannot handle SIGTERM
        self._signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_quietly(process)
        self._forget()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush beyond what the fsync policy already wrote."""
        process = self._process
        if process is None:
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        self._forget()

    def _forget(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._process = None
        self._paused = False

    def restart(self, *, kill: bool = False) -> RedisServerProcess:
        """Stop (or SIGKILL with ``kill=True``) and start again on the same port and dir."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the socket stays open but nothing answers, like a hung server."""
        if self.running:
            self._signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._signal(signal.SIGCONT)
            self._paused = False

    def cleanup(self) -> None:
        """Stop the server and delete the data dir if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
