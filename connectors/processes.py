"""Starting and stopping a worker process (for the demo, the bench and the tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from pydantic import SecretStr

from streams.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``SLUICE_*`` environment that gives a worker process exactly these settings
    (secrets passed as their value; ``worker_id`` left for each process to derive)."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None or name == "worker_id":
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"SLUICE_{name.upper()}"] = str(value)
    return env


#: What a Faust worker logs once it has joined the group and got its partitions.
WORKER_READY = "[^Worker]: Ready"


class WorkerProcess:
    """A ``sluice worker`` child process with its log in a file."""

    def __init__(self, log_file: Path, env: Mapping[str, str] | None = None) -> None:
        self.log_file = log_file
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0  # where this run's output begins (the file is appended to)

    def mark_log_start(self) -> None:
        """Only log lines written from now on count for :meth:`wait_for_log`."""
        try:
            self._log_start = self.log_file.stat().st_size
        except OSError:
            self._log_start = 0

    def start(self) -> WorkerProcess:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.mark_log_start()
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "connectors.cli", "worker"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no final commit (what a crash looks like)."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait for a clean shutdown, SIGKILL if it takes longer than ``timeout``."""
        if self.proc is None:
            return None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_for_log(self, needle: str, timeout: float) -> bool:
        """Wait until ``needle`` appears in this run's part of the log (or the process
        exits). Lines an earlier run left in the same file do not count."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            with contextlib.suppress(OSError), self.log_file.open("rb") as log:
                log.seek(self._log_start)
                if needle in log.read().decode(errors="replace"):
                    return True
            if not self.alive():
                return False
            time.sleep(0.2)
        return False
