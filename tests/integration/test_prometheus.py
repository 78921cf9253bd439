"""A real Prometheus server (Debian's package) scrapes two workers and evaluates our rules.

Prometheus runs on 127.0.0.1 on a free port with a temporary config that loads
deploy/prometheus/rules.yml and monitors.rules.yml and scrapes two benchmark workers'
/metrics every second as job ``sluice-worker``. After some requests, every rule's
expression is queried through the HTTP API: each must evaluate, and the traffic ones must
see both workers' series. Prometheus is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from connectors.client import SluiceClient
from tests.integration.helpers import start_worker

pytestmark = pytest.mark.integration

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULE_FILES = (PROMETHEUS_DIR / "rules.yml", PROMETHEUS_DIR / "monitors.rules.yml")
REQUESTS = 40


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing in CI: make test installs Debian's prometheus")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    return path


def rule_exprs() -> list[tuple[str, str]]:
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                found.append((rule.get("record") or rule["alert"], rule["expr"]))
    return found


def query(client: httpx.Client, expr: str) -> list[dict[str, Any]]:
    reply = client.get("/api/v1/query", params={"query": expr})
    body = reply.json()
    assert reply.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def wait_for(check: Any, timeout: float, what: str) -> Any:
    give_up = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


async def test_prometheus_scrapes_two_workers_and_evaluates_the_rules(
    settings_factory: Any, tmp_path: Path
) -> None:
    binary = prometheus_binary()
    base = settings_factory(
        backend="benchmark",
        model_name="benchmark",
        benchmark_delay_ms=5,
        worker_role="inference",
        batch_max_size=8,
    )
    ports = [free_port(), free_port()]
    settings = [
        base.model_copy(update={"metrics_port": port, "worker_id": f"prom-w{i}"})
        for i, port in enumerate(ports)
    ]
    prom_port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [
            {
                "job_name": "sluice-worker",
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}],
            }
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    command = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]
    prometheus = await asyncio.to_thread(
        subprocess.Popen, command, stdout=log, stderr=subprocess.STDOUT
    )
    workers = []
    try:
        workers = list(
            await asyncio.gather(
                *(
                    asyncio.to_thread(start_worker, s, tmp_path, f"prom-w{i}")
                    for i, s in enumerate(settings)
                )
            )
        )
        api = httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10)
        async with SluiceClient(base) as client:
            # a first burst makes the counters exist in Prometheus; the second one is what
            # rate() then sees increase
            for burst in (range(0, 4), range(4, REQUESTS)):
                ids = [await client.publish(f"prompt {i}", max_new_tokens=4) for i in burst]
                results = [await client.result(rid, timeout=60) for rid in ids]
                assert {r["status"] for r in results} == {"OK"}
                await asyncio.to_thread(wait_until_counted, api, burst.stop)
        await asyncio.to_thread(check_rules, api, ports)
        await asyncio.to_thread(api.close)
    finally:
        for worker in workers:
            await asyncio.to_thread(worker.stop, 60)
        prometheus.terminate()
        try:
            await asyncio.to_thread(prometheus.wait, 20)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            await asyncio.to_thread(prometheus.wait, 10)
        log.close()


def wait_until_counted(api: httpx.Client, requests: int) -> None:
    wait_for(lambda: api.get("/-/ready").status_code == 200, 60, "prometheus ready")

    def both_up() -> bool:
        targets = api.get("/api/v1/targets").json()["data"]["activeTargets"]
        return len(targets) == 2 and all(t["health"] == "up" for t in targets)

    wait_for(both_up, 60, "both workers scraped")

    def counted() -> bool:
        rows = query(api, 'sum(sluice_requests_total{job="sluice-worker"})')
        return bool(rows) and float(rows[0]["value"][1]) >= requests

    wait_for(counted, 60, f"{requests} requests counted")


def check_rules(api: httpx.Client, ports: list[int]) -> None:
    instances = query(api, 'count by (instance) (sluice_model_info{job="sluice-worker"})')
    assert {row["metric"]["instance"] for row in instances} == {f"127.0.0.1:{p}" for p in ports}
    by_name = dict(rule_exprs())
    for expr in by_name.values():
        query(api, expr)  # every rule's expression evaluates
    rates = query(api, by_name["sluice:requests:rate5m"])
    assert any(float(r["value"][1]) > 0 for r in rates), rates
    errors = query(api, by_name["sluice:request_errors:ratio_rate5m"])
    # no ERROR series exists yet, so the ratio is absent (not 0): nothing may read as errors
    assert all(float(r["value"][1]) == 0.0 for r in errors), errors
    p99 = query(api, by_name["sluice:request_latency_seconds:p99_5m"])
    assert any(r["metric"].get("stage") == "total" for r in p99), p99

    def rules_loaded() -> list[dict[str, Any]]:
        groups = api.get("/api/v1/rules").json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if len(rules) == len(by_name) else []

    rules = wait_for(rules_loaded, 30, "all rules loaded")
    errors_seen = {r["name"]: r.get("lastError") for r in rules if r.get("lastError")}
    assert not errors_seen, errors_seen
    names = {r["name"] for r in rules}
    assert {"SluiceEmptyAnswers", "SluicePromptDrift", "sluice:requests:rate5m"} <= names
