"""``sluice top``'s pure parts: a snapshot drawn as text, the newest window per version,
optional monitor fields, member assignments decoded."""

from __future__ import annotations

import json

from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from rich.console import Console

from connectors.top.gather import decode_assignment, parse_members
from connectors.top.render import monitors, owned_partitions, render
from connectors.top.snapshot import Group, Member, PartitionLag, Snapshot, latest_windows
from streams.rollout import RolloutState


def _window(version: str, start: int, requests: int, **extra: object) -> dict[str, object]:
    return {
        "window_id": f"10s:{start}:m:{version}:",
        "window_start": start,
        "length_s": 10,
        "model": "m",
        "model_version": version,
        "tenant": "",
        "correction": False,
        "requests": {"OK": requests - 1, "ERROR": 1},
        "requests_total": requests,
        "dead_letters_total": 0,
        "latency": {"total": {"p50_ms": 120.0, "p99_ms": 1500.0}},
        "tokens_per_s": 12.5,
        "batch_size_mean": 3.5,
        "batch_size_max": 8,
        "feedback_count": 2,
        "feedback_mean_score": 0.5,
        **extra,
    }


def _text(snapshot: Snapshot) -> str:
    console = Console(record=True, width=200)
    console.print(render(snapshot))
    return console.export_text()


def test_a_snapshot_shows_workers_lag_windows_split_and_decision() -> None:
    member = Member(
        "faust-0.15.3", "10.0.0.7", (("llm.requests", 1), ("llm.requests", 0)), "m-abcdef"
    )
    evidence = {
        "reason": "not worse by the margins after 240 candidate results",
        "candidate": {"version": "v2", "requests": 240},
        "base": {"version": "", "requests": 960},
    }
    snapshot = Snapshot(
        taken_at_ms=1_700_000_000_000,
        bootstrap="broker:9092",
        groups=(Group("sluice", "inference", "Stable", (member,)),),
        partitions=(
            PartitionLag("sluice", "llm.requests", 0, 1200, 1000, member.label),
            PartitionLag("sluice", "llm.requests", 1, 40, None, member.label),
        ),
        windows=(
            _window("", 1_700_000_000_000, 80),
            _window("v2", 1_700_000_000_000, 20, refusal_rate=0.05, prompt_drift_p_value=0.001),
        ),
        rollout=RolloutState(candidate="v2", canary_percent=20),
        control_commands=2,
        last_decision={"command": "PROMOTE", "evidence": json.dumps(evidence)},
    )
    text = _text(snapshot)
    assert "workers 1  request lag 240" in text  # 200 + 40 (nothing committed on 1)
    assert "candidate v2 at 20% (base 80%)" in text and "[2 commands]" in text
    assert "last auto decision: PROMOTE v2 vs base: not worse by the margins" in text
    assert "candidate 240 results, base 960" in text
    assert "faust-0.15.3~abcdef" in text and "llm.requests 0,1" in text
    lines = {line.split("│")[2].strip(): line for line in text.splitlines() if "│ m/" in line}
    assert set(lines) == {"m/-", "m/v2"}
    assert "80%" in lines["m/-"] and "20%" in lines["m/v2"]
    for cell in ("120ms", "1.50s", "3.5/8", "12.5", "2 (+0.50)", "8.0"):
        assert cell in lines["m/-"], cell
    assert "drift p 0.001 DRIFT" in lines["m/v2"] and "refusal 5.0%" in lines["m/v2"]
    assert lines["m/-"].rstrip(" │").endswith("-"), "no monitor readings"


def test_an_empty_snapshot_says_what_is_missing() -> None:
    text = _text(Snapshot(0, "b", errors=("llm.metrics does not exist yet",)))
    assert "no groups" in text and "no closed window yet" in text
    assert "llm.control not read" in text and "! llm.metrics does not exist yet" in text


def test_monitor_fields_show_when_present_including_unknown_ones() -> None:
    assert monitors({}).plain == "-"
    shown = monitors(
        {"empty_rate": 0.25, "prompt_drift_p_value": 0.2, "toxicity_score": 0.123, "latency": {}}
    ).plain
    assert shown == "drift p 0.200  empty 25.0%  toxicity_score 0.123"
    assert monitors({"new_flag": True}).plain == "new_flag yes"


def test_latest_windows_keeps_the_newest_base_window_per_version() -> None:
    windows = [
        _window("v1", 0, 5),
        _window("v1", 10_000, 6),
        _window("v2", 0, 7),
        {**_window("v1", 20_000, 9), "correction": True},
        {**_window("v1", 60_000, 50), "length_s": 60},
    ]
    assert [(w["model_version"], w["requests_total"]) for w in latest_windows(windows)] == [
        ("v1", 6),
        ("v2", 7),
    ]


def test_member_assignments_are_decoded() -> None:
    data = ConsumerProtocolMemberAssignment(
        0, [("llm.requests", [2, 0]), ("app-__assignor-__leader", [0])], b"x"
    ).encode()
    assert decode_assignment(data) == (
        ("app-__assignor-__leader", 0),
        ("llm.requests", 0),
        ("llm.requests", 2),
    )
    assert decode_assignment(b"\x00garbage") == () and decode_assignment(None) == ()
    v4 = parse_members([("member-123456", None, "faust", "/10.1.1.1", b"", data)])
    v0 = parse_members([("member-123456", "faust", "/10.1.1.1", b"", data)])
    assert v4 == v0 and v0[0].host == "10.1.1.1" and v0[0].label == "faust~123456"
    assert owned_partitions(v0[0].partitions, "app-") == "llm.requests 0,2"


def test_the_live_view_keeps_the_last_snapshot_when_the_broker_fails(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import connectors.top as top
    from connectors.top.gather import TopError
    from streams.settings import Settings

    good = Snapshot(0, "b", windows=(_window("v1", 0, 5),))
    answers: list[object] = [good, TopError("cannot read the broker at b: gone")]
    frames: list[str] = []

    async def fake_snapshot(*_: object) -> Snapshot:
        if not answers:
            raise KeyboardInterrupt
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    class FakeLive:
        def __init__(self, renderable: object, **_: object) -> None:
            self.update(renderable)

        def __enter__(self) -> FakeLive:
            return self

        def __exit__(self, *_: object) -> None:
            return None

        def update(self, renderable: object) -> None:
            console = Console(record=True, width=200)
            console.print(renderable)
            frames.append(console.export_text())

    monkeypatch.setattr(top, "take_snapshot", fake_snapshot)
    monkeypatch.setattr(top, "Live", FakeLive)
    last = top.run_top(Settings(), "b", None, Console(), interval_s=0.01)  # type: ignore[arg-type]
    assert last is good
    assert "connecting" in frames[0]
    assert "m/v1" in frames[1] and "cannot read" not in frames[1]
    assert "m/v1" in frames[2] and "! cannot read the broker at b: gone" in frames[2]
