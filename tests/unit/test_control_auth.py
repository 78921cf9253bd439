"""Signed control commands (streams.control_auth): signing, verification, key settings, and
which env files of ``sluice kafka up --secure`` get the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from schemas.codec import AvroCodec
from streams.control_auth import (
    HEADER_KEY_ID,
    HEADER_SIGNATURE,
    ControlAuthError,
    ControlKeys,
    Verdict,
    control_keys,
    parse_trusted_keys,
    sign,
    verify,
)
from streams.settings import Settings

KEY = SecretStr("k" * 32)
OTHER = SecretStr("o" * 32)


def _value() -> bytes:
    return AvroCodec.default().encode(
        "ControlCommand",
        {
            "command_id": "c1",
            "command": "CANARY",
            "model": "m",
            "version": None,
            "percent": 100,
            "issued_by": "op",
            "created_at": 1,
        },
    )


def test_signed_value_verifies_under_the_same_key() -> None:
    value = _value()
    headers = sign(value, "k1", KEY)
    assert dict(headers)[HEADER_KEY_ID] == b"k1"
    assert len(dict(headers)[HEADER_SIGNATURE]) == 64  # hex SHA-256
    assert verify(value, headers, {"k1": KEY}) == Verdict(True, None, "k1")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda v, h: (v, []), "unsigned"),
        (lambda v, h: (v, [(HEADER_KEY_ID, b"k1")]), "unsigned"),
        (lambda v, h: (v, [(HEADER_SIGNATURE, b""), (HEADER_KEY_ID, b"k1")]), "unsigned"),
        (lambda v, h: (v, sign(v, "k1", OTHER)), "bad_signature"),
        (lambda v, h: (v[:-1] + bytes([v[-1] ^ 1]), h), "bad_signature"),  # value changed
        (lambda v, h: (v + b"\x00", h), "bad_signature"),
        (lambda v, h: (v, sign(v, "k9", KEY)), "unknown_key"),
        (lambda v, h: (v, [(HEADER_SIGNATURE, dict(h)[HEADER_SIGNATURE])]), "unknown_key"),
        (lambda v, h: (v, [(HEADER_SIGNATURE, b"zz"), (HEADER_KEY_ID, b"k1")]), "bad_signature"),
    ],
)
def test_untrusted_commands_are_rejected_with_a_reason(mutate, reason: str) -> None:
    value = _value()
    bad_value, headers = mutate(value, sign(value, "k1", KEY))
    verdict = verify(bad_value, headers, {"k1": KEY})
    assert not verdict.ok and verdict.reason == reason


def test_the_first_of_a_repeated_header_counts() -> None:
    value = _value()
    good = sign(value, "k1", KEY)
    forged = sign(value, "k1", OTHER)
    assert verify(value, good + forged, {"k1": KEY}).ok
    assert not verify(value, forged + good, {"k1": KEY}).ok


def test_no_keys_accepts_everything_and_any_key_requires_signatures() -> None:
    value = _value()
    open_keys = ControlKeys()
    assert not open_keys.required and open_keys.sign(value) == []
    assert open_keys.verify(value, []).ok
    strict = ControlKeys(trusted={"k1": KEY})
    assert strict.required and strict.sign(value) == []  # verifies, cannot sign
    assert strict.verify(value, []).reason == "unsigned"


def test_rotation_old_and_new_keys_are_both_trusted() -> None:
    settings = Settings(
        control_signing_key=OTHER,
        control_signing_key_id="new",
        control_trusted_keys=SecretStr(f"old:{KEY.get_secret_value()}"),
    )
    keys = control_keys(settings)
    value = _value()
    assert sorted(keys.trusted) == ["new", "old"]
    assert dict(keys.sign(value))[HEADER_KEY_ID] == b"new"
    assert keys.verify(value, keys.sign(value)).ok
    assert keys.verify(value, sign(value, "old", KEY)).ok
    assert "o" * 32 not in repr(keys) and "k" * 32 not in repr(keys)


def test_settings_without_keys_verify_nothing() -> None:
    assert control_keys(Settings()) == ControlKeys()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"control_signing_key": SecretStr("short")}, "shorter than 16 bytes"),
        ({"control_trusted_keys": SecretStr("a:short")}, "shorter than 16 bytes"),
        ({"control_trusted_keys": SecretStr("no-colon-here-at-all")}, "id:secret"),
        ({"control_trusted_keys": SecretStr(f":{'x' * 20}")}, "id:secret"),
        (
            {
                "control_signing_key": KEY,
                "control_signing_key_id": "a",
                "control_trusted_keys": SecretStr(f"a:{OTHER.get_secret_value()}"),
            },
            "one secret",
        ),
    ],
)
def test_bad_key_settings_are_configuration_errors(fields: dict, match: str) -> None:
    with pytest.raises(ControlAuthError, match=match) as caught:
        control_keys(Settings(**fields))
    assert caught.value.retriable is False
    assert "x" * 20 not in str(caught.value) and OTHER.get_secret_value() not in str(caught.value)


def test_parse_trusted_keys_ignores_blanks_and_spaces() -> None:
    keys = parse_trusted_keys(f" a:{'1' * 16} , ,b:{'2' * 16}:with-colon ")
    assert {k: v.get_secret_value() for k, v in keys.items()} == {
        "a": "1" * 16,
        "b": "2" * 16 + ":with-colon",
    }


def test_secure_env_files_give_the_key_to_workers_and_operators_only(tmp_path: Path) -> None:
    from deploy.local_kafka import LocalKafka

    kafka = LocalKafka(tmp_path, secure=True)
    kafka._ensure_security(None)  # what `sluice kafka up --secure` creates before the start
    assert kafka.control_key_file.stat().st_mode & 0o077 == 0
    key = kafka.control_key_file.read_text().strip()
    assert len(key) >= 32
    worker = kafka.client_env("worker", "127.0.0.1:1")
    operator = kafka.client_env("operator", "127.0.0.1:1")
    producer = kafka.client_env("producer", "127.0.0.1:1")
    assert worker["SLUICE_CONTROL_SIGNING_KEY"] == operator["SLUICE_CONTROL_SIGNING_KEY"] == key
    assert not any(name.startswith("SLUICE_CONTROL_") for name in producer)
    assert key not in "".join(producer.values())
    assert "control_signing_key" not in kafka.settings_fields("producer", "127.0.0.1:1")
    fields = kafka.settings_fields("operator", "127.0.0.1:1")
    assert control_keys(Settings(**fields)).signing is not None
    kafka._ensure_security(None)
    assert kafka.control_key_file.read_text().strip() == key, "generated once"


def test_a_worker_without_keys_says_once_that_commands_are_not_authenticated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from streams.control import announce_keys

    with caplog.at_level("INFO", logger="streams.control"):
        announce_keys(ControlKeys(), "llm.control")
        announce_keys(ControlKeys(trusted={"k1": KEY, "k0": OTHER}), "llm.control")
    warned, informed = caplog.records
    assert warned.levelname == "WARNING" and "not authenticated" in warned.getMessage()
    assert informed.levelname == "INFO" and "key id k0 or k1" in informed.getMessage()
    assert KEY.get_secret_value() not in caplog.text
