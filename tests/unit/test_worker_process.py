"""WorkerProcess.wait_for_log: a log file shared across runs must not fool the wait."""

from __future__ import annotations

from pathlib import Path

from connectors.processes import WORKER_READY, WorkerProcess


def test_a_ready_line_from_an_earlier_run_does_not_count(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text(f"old run\n{WORKER_READY}\nold run stopped\n")
    worker = WorkerProcess(log)
    worker.mark_log_start()  # what start() does before the new process writes anything
    # No process: the wait gives up at once instead of trusting the old line.
    assert worker.wait_for_log(WORKER_READY, timeout=5) is False
    with log.open("a") as f:
        f.write(f"new run\n{WORKER_READY}\n")
    assert worker.wait_for_log(WORKER_READY, timeout=5) is True


def test_a_missing_log_file_starts_at_zero(tmp_path: Path) -> None:
    log = tmp_path / "new" / "worker.log"
    worker = WorkerProcess(log)
    worker.mark_log_start()
    log.parent.mkdir()
    log.write_text(WORKER_READY)
    assert worker.wait_for_log(WORKER_READY, timeout=5) is True
