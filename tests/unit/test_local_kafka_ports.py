"""Port choice of the local broker: a remembered port is waited for, not given up at once."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from deploy.local_kafka import LocalKafka


def _listen() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, int(sock.getsockname()[1])


def _remember(kafka: LocalKafka, port: int) -> None:
    kafka.state_dir.mkdir(parents=True)
    kafka.ports_file.write_text(json.dumps({"port": port}))


def test_remembered_port_freed_within_the_wait_is_kept(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, port_wait=10.0)
    holder, port = _listen()
    _remember(kafka, port)
    threading.Timer(0.5, holder.close).start()
    steps: list[str] = []
    started = time.monotonic()
    chosen, controller = kafka._choose_ports(steps.append)
    assert chosen == port
    assert controller != port
    assert 0.4 < time.monotonic() - started < 10.0
    assert any("waiting up to" in step for step in steps)


def test_remembered_port_still_busy_after_the_wait_moves(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, port_wait=0.5)
    holder, port = _listen()
    try:
        _remember(kafka, port)
        steps: list[str] = []
        chosen, _ = kafka._choose_ports(steps.append)
    finally:
        holder.close()
    assert chosen != port
    assert any(f"the broker moves to {chosen}" in step for step in steps)


def test_free_remembered_port_is_taken_without_waiting(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, port_wait=30.0)
    holder, port = _listen()
    holder.close()
    _remember(kafka, port)
    steps: list[str] = []
    started = time.monotonic()
    assert kafka._choose_ports(steps.append)[0] == port
    assert time.monotonic() - started < 5.0
    assert steps == []
