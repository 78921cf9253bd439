"""Admission: every rejection has its reason code; accepted requests carry the right fields."""

from __future__ import annotations

import math
from typing import Any

import pytest

from inference.errors import InvalidRequestError
from inference.types import Sampling
from streams.admission import Admission, AdmissionLimits

SERVED = "smol"
WALL_MS = 1_700_000_000_000  # the injected wall clock, epoch ms
MONO = 5_000.0  # the injected monotonic clock, seconds
LIMITS = AdmissionLimits(max_prompt_chars=200, max_prompt_tokens=10, max_new_tokens_limit=32)


def encode(prompt: str, system: str | None, raw: bool) -> list[int]:
    """One token per space-separated word, plus a marker token per template piece."""
    words = [len(w) for w in prompt.split()]
    if raw:
        return words
    return [-1] + ([-2] if system else []) + words


def admission(served: set[str] | None = None, limits: AdmissionLimits = LIMITS) -> Admission:
    return Admission(
        limits,
        served_models=lambda: {SERVED} if served is None else served,
        encode=encode,
        clock=lambda: MONO,
        wall_clock_ms=lambda: WALL_MS,
    )


def record(**fields: Any) -> dict[str, Any]:
    """An InferenceRequest as the codec decodes it (schema defaults filled in)."""
    base: dict[str, Any] = {
        "request_id": "r-1",
        "model": "default",
        "prompt": "What is the capital of France?",
        "system": None,
        "raw": False,
        "sampling": {
            "max_new_tokens": 16,
            "temperature": 0.0,
            "top_p": 1.0,
            "stop": [],
            "seed": None,
        },
        "priority": 0,
        "deadline_ms": None,
        "tenant": None,
        "created_at": 0,
        "metadata": {},
    }
    sampling = fields.pop("sampling", None)
    base.update(fields)
    if sampling is not None:
        base["sampling"] = {**base["sampling"], **sampling}
    return base


def rejection(rec: dict[str, Any], adm: Admission | None = None) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        (adm or admission()).admit(rec, WALL_MS)
    return info.value


# -- rejections ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"request_id": ""}, "invalid_request"),
        ({"request_id": "   "}, "invalid_request"),
        ({"request_id": None}, "invalid_request"),
        ({"prompt": ""}, "invalid_request"),
        ({"prompt": " \n\t "}, "invalid_request"),
        ({"deadline_ms": 0}, "invalid_request"),
        ({"deadline_ms": -5}, "invalid_request"),
        ({"model": "gpt-nine"}, "unknown_model"),
        ({"prompt": "x" * 201}, "prompt_too_long"),  # characters
        ({"prompt": " ".join(["w"] * 10)}, "prompt_too_long"),  # 10 words + template = 11
        ({"raw": True, "prompt": " ".join(["w"] * 11)}, "prompt_too_long"),
        ({"sampling": {"max_new_tokens": 0}}, "bad_sampling"),
        ({"sampling": {"max_new_tokens": -1}}, "bad_sampling"),
        ({"sampling": {"max_new_tokens": 33}}, "bad_sampling"),
        ({"sampling": {"temperature": -0.1}}, "bad_sampling"),
        ({"sampling": {"temperature": math.nan}}, "bad_sampling"),
        ({"sampling": {"temperature": math.inf}}, "bad_sampling"),
        ({"sampling": {"temperature": 5.01}}, "bad_sampling"),
        ({"sampling": {"top_p": 0.0}}, "bad_sampling"),
        ({"sampling": {"top_p": -0.5}}, "bad_sampling"),
        ({"sampling": {"top_p": 1.01}}, "bad_sampling"),
        ({"sampling": {"top_p": math.nan}}, "bad_sampling"),
        ({"sampling": {"stop": ["ok", ""]}}, "bad_sampling"),
        ({"sampling": {"stop": [f"s{i}" for i in range(17)]}}, "bad_sampling"),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, dict) else v,
)
def test_rejection_reason_codes(fields: dict[str, Any], code: str) -> None:
    error = rejection(record(**fields))
    assert error.reason_code == code
    assert str(error)  # a human-readable reason goes on the dead letter too


def test_unknown_model_message_names_what_is_served() -> None:
    error = rejection(record(model="other"), admission({"a-model", "b-model"}))
    assert error.reason_code == "unknown_model"
    assert "other" in str(error) and "a-model" in str(error) and "b-model" in str(error)


def test_prompt_too_long_message_gives_the_count_and_limit() -> None:
    chars = rejection(record(prompt="y" * 250))
    assert "250" in str(chars) and "200" in str(chars)
    tokens = rejection(record(prompt=" ".join(["w"] * 12)))
    assert "13" in str(tokens) and "10" in str(tokens)


def test_served_models_are_asked_each_time() -> None:
    served = {"old"}
    adm = admission(served)
    adm.admit(record(model="old"), WALL_MS)
    served.discard("old")
    served.add("new")
    assert rejection(record(model="old"), adm).reason_code == "unknown_model"
    assert adm.admit(record(model="new"), WALL_MS).request_id == "r-1"


# -- acceptance ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["default", SERVED, "", None])
def test_accepts_default_and_served_model(model: str | None) -> None:
    request = admission().admit(record(model=model), WALL_MS)
    assert request.request_id == "r-1"
    assert request.prompt == "What is the capital of France?"


def test_accepted_request_carries_everything() -> None:
    rec = record(
        request_id="req-42",
        prompt="tell me a story",
        system="be brief",
        priority=7,
        sampling={
            "max_new_tokens": 32,
            "temperature": 0.7,
            "top_p": 0.9,
            "stop": ["\n\n", "THE END"],
            "seed": 1234,
        },
    )
    request = admission().admit(rec, WALL_MS)
    assert request.request_id == "req-42"
    assert request.system == "be brief"
    assert request.raw is False
    assert request.priority == 7
    assert request.sampling == Sampling(
        max_new_tokens=32, temperature=0.7, top_p=0.9, stop=("\n\n", "THE END"), seed=1234
    )
    assert request.prompt_ids == encode("tell me a story", "be brief", False)
    assert request.prompt_ids == [-1, -2, 4, 2, 1, 5]
    assert request.token_cost == 6 + 32
    assert request.deadline is None
    assert request.admitted_at == MONO


def test_raw_flag_reaches_the_encoder() -> None:
    request = admission().admit(record(prompt="a bb", raw=True), WALL_MS)
    assert request.raw is True
    assert request.prompt_ids == [1, 2]  # no template marker


def test_boundaries_are_inclusive() -> None:
    rec = record(
        prompt="x" * 200,
        sampling={"max_new_tokens": 32, "temperature": 5.0, "top_p": 1.0},
    )
    request = admission().admit(rec, WALL_MS)
    assert request.sampling.max_new_tokens == 32
    assert request.sampling.temperature == 5.0
    nine_words = record(prompt=" ".join(["w"] * 9))  # 9 + template marker = 10 tokens
    assert len(admission().admit(nine_words, WALL_MS).prompt_ids) == 10
    tiny = record(sampling={"max_new_tokens": 1, "temperature": 0.0, "top_p": 1e-6})
    assert admission().admit(tiny, WALL_MS).sampling.top_p == 1e-6


def test_missing_sampling_gets_defaults_within_limits() -> None:
    rec = record()
    rec["sampling"] = {}
    limits = AdmissionLimits(max_prompt_chars=200, max_prompt_tokens=10, max_new_tokens_limit=64)
    request = admission(limits=limits).admit(rec, WALL_MS)
    assert request.sampling.temperature == 0.0
    assert request.sampling.top_p == 1.0
    assert request.sampling.stop == ()
    assert request.sampling.seed is None
    assert 1 <= request.sampling.max_new_tokens <= 64


def test_none_priority_is_zero() -> None:
    assert admission().admit(record(priority=None), WALL_MS).priority == 0


# -- deadlines -------------------------------------------------------------------------------


def test_deadline_from_created_at_plus_budget() -> None:
    # Created 1 s ago (wall clock) with a 3 s budget: 2 s left on the monotonic clock.
    rec = record(created_at=WALL_MS - 1_000, deadline_ms=3_000)
    request = admission().admit(rec, record_timestamp_ms=WALL_MS - 50_000)
    assert request.deadline == pytest.approx(MONO + 2.0)


def test_deadline_falls_back_to_the_record_timestamp() -> None:
    rec = record(created_at=0, deadline_ms=10_000)
    request = admission().admit(rec, record_timestamp_ms=WALL_MS - 4_000)
    assert request.deadline == pytest.approx(MONO + 6.0)


def test_deadline_falls_back_to_now_without_any_timestamp() -> None:
    rec = record(created_at=0, deadline_ms=1_500)
    request = admission().admit(rec, record_timestamp_ms=0)
    assert request.deadline == pytest.approx(MONO + 1.5)


def test_deadline_already_past_is_admitted_but_in_the_past() -> None:
    """Expiry is answered as a result (EXPIRED), not a dead letter: admission lets it pass."""
    rec = record(created_at=WALL_MS - 10_000, deadline_ms=2_000)
    request = admission().admit(rec, WALL_MS)
    assert request.deadline == pytest.approx(MONO - 8.0)
    assert request.deadline < MONO


def test_deadline_uses_the_injected_clocks() -> None:
    mono = [100.0]
    wall = [2_000_000]
    adm = Admission(
        LIMITS,
        served_models=lambda: {SERVED},
        encode=encode,
        clock=lambda: mono[0],
        wall_clock_ms=lambda: wall[0],
    )
    rec = record(created_at=1_999_000, deadline_ms=5_000)
    first = adm.admit(rec, 0)
    assert first.deadline == pytest.approx(104.0)
    # The same record read 2 s later (both clocks moved): the same monotonic deadline.
    mono[0] += 2.0
    wall[0] += 2_000
    second = adm.admit(rec, 0)
    assert second.deadline == pytest.approx(104.0)
    assert second.admitted_at == 102.0
