"""What an automatic canary decision publishes: its evidence as JSON in the ControlCommand
(schema v2, v1 records still readable), shown decoded by ``sluice tail``; and the benchmark
engine's broken-version drill the canary scenario uses."""

from __future__ import annotations

import json
import math

from connectors.tail import describe_value, format_line
from inference.backends.benchmark import BenchmarkEngine
from inference.types import GenerationRequest, Sampling
from schemas import AvroCodec, SchemaCatalog
from streams.canary import CanaryPolicy, arm_stats, decide, evidence_json
from tests.unit.test_canary import BASE, CANDIDATE, window_factory

V1_FILE = "previous/ControlCommand.v1.avsc"


def _decision(candidate_error: int, drift_p: float | None = None):  # type: ignore[no-untyped-def]
    windows = [
        window_factory(BASE, i * 10_000, ok=200, latencies=[100.0 + i % 7] * 200) for i in range(5)
    ] + [
        window_factory(
            CANDIDATE, i * 10_000, ok=100 - candidate_error, error=candidate_error, drift_p=drift_p
        )
        for i in range(5)
    ]
    policy = CanaryPolicy()
    return decide(arm_stats(CANDIDATE, windows), arm_stats(BASE, windows), policy), policy


def test_evidence_holds_both_arms_the_bounds_the_margins_and_the_reason() -> None:
    decision, policy = _decision(candidate_error=30, drift_p=0.001)
    assert decision.verdict == "ROLLBACK"
    evidence = json.loads(evidence_json(decision, policy))
    assert evidence["verdict"] == "ROLLBACK" and evidence["reason"] == decision.reason
    candidate, base = evidence["candidate"], evidence["base"]
    assert (candidate["version"], candidate["requests"], candidate["windows"]) == (
        CANDIDATE,
        500,
        5,
    )
    assert (base["version"], base["requests"], base["windows"]) == (BASE, 1000, 5)
    assert candidate["bad_rate"] == 0.3 and base["bad_rate"] == 0.0
    assert candidate["drifted"] is True and base["drifted"] is False
    assert base["p99_ms"] is not None and candidate["feedback_mean"] is None
    bad = evidence["checks"]["bad_answers"]
    assert bad["lower"] > 0 and bad["upper"] > bad["estimate"] > bad["lower"]
    assert bad["margin"] == policy.error_margin
    assert evidence["checks"]["feedback"]["tested"] is False
    assert evidence["policy"]["alpha"] == policy.alpha


def test_evidence_is_compact_json_without_nan() -> None:
    decision, policy = _decision(candidate_error=0)
    decision.checks["latency"]["threshold_ms"] = math.inf
    decision.checks["latency"]["estimate"] = math.nan
    text = evidence_json(decision, policy)
    assert " " not in text.replace(decision.reason, "")
    latency = json.loads(text)["checks"]["latency"]
    assert latency["threshold_ms"] is None and latency["estimate"] is None


def _command(**extra: object) -> dict[str, object]:
    return {
        "command_id": "c1",
        "command": "ROLLBACK",
        "model": "m",
        "version": None,
        "percent": None,
        "issued_by": "canary-auto:ops",
        "created_at": 1,
        **extra,
    }


def _v1_catalog() -> SchemaCatalog:
    """A producer that still writes ControlCommand v1 (no evidence)."""
    from importlib import resources

    v1 = json.loads(resources.files("schemas").joinpath("avro", V1_FILE).read_text())
    catalog = SchemaCatalog.default()
    catalog.add(v1, make_current=True)
    return catalog


def test_v1_commands_stay_readable_and_v2_carries_evidence() -> None:
    current = AvroCodec.default()
    old = AvroCodec(_v1_catalog())
    name, decoded = current.decode(old.encode("ControlCommand", _command()))
    assert name == "ControlCommand" and decoded["evidence"] is None
    assert decoded["command"] == "ROLLBACK" and decoded["issued_by"] == "canary-auto:ops"
    _, new = current.decode(current.encode("ControlCommand", _command(evidence='{"a":1}')))
    assert new["evidence"] == '{"a":1}'
    assert (
        current.encode("ControlCommand", _command())[1:5]
        != old.encode("ControlCommand", _command())[1:5]
    ), "a new schema id"


def test_tail_shows_the_evidence_as_json() -> None:
    codec = AvroCodec.default()
    decision, policy = _decision(candidate_error=30)
    value = codec.encode("ControlCommand", _command(evidence=evidence_json(decision, policy)))
    line = format_line(
        {"partition": 0, "offset": 3, "key": "m", "value": describe_value(codec, value)}
    )
    shown = json.loads(line)["value"]
    assert shown["_schema"] == "ControlCommand"
    assert shown["evidence"]["verdict"] == "ROLLBACK"
    assert shown["evidence"]["candidate"]["requests"] == 500
    plain = format_line({"value": {"_schema": "ControlCommand", "evidence": "not json"}})
    assert json.loads(plain)["value"]["evidence"] == "not json"
    no_evidence = codec.encode("ControlCommand", _command())
    assert (
        json.loads(format_line({"value": describe_value(codec, no_evidence)}))["value"]["evidence"]
        is None
    )


def _request(prompt: str) -> GenerationRequest:
    return GenerationRequest(
        request_id=prompt, prompt=prompt, prompt_ids=[0, 0], sampling=Sampling(max_new_tokens=4)
    )


async def test_broken_benchmark_versions_answer_empty_or_fail_each_request() -> None:
    batch = [_request("a b"), _request("c d")]
    good = await BenchmarkEngine().generate(batch)
    assert all(c.text for c in good)  # type: ignore[union-attr]
    empty = await BenchmarkEngine(broken="empty").generate(batch)
    assert [(c.text, c.completion_tokens, c.finish_reason) for c in empty] == [  # type: ignore[union-attr]
        ("", 0, "stop"),
        ("", 0, "stop"),
    ]
    failing = BenchmarkEngine(broken="error")
    errors = await failing.generate(batch)
    assert all(isinstance(e, Exception) and not getattr(e, "fatal", False) for e in errors)
    assert failing.dead_error is None, "a broken version is not a dead engine"
