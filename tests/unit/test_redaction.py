"""PII redaction: every kind in several formats is replaced, nothing else is touched."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest

from streams.redaction import (
    ADDRESS,
    CARD,
    DOB,
    EMAIL,
    IBAN,
    IP,
    KINDS,
    NAME,
    NATIONAL_ID,
    PHONE,
    SECRET,
    RedactionResult,
    Redactor,
    luhn_ok,
    merge_counts,
    name_lexicon,
    placeholder,
)


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    r = Redactor()
    r.warm_up()
    return r


# (text, expected text) -- realistic prompts, answers and corrections with PII in them.
POSITIVE: list[tuple[str, str]] = [
    # e-mail
    ("Contact me at jane.doe@example.com please.", "Contact me at [EMAIL] please."),
    ("cc: JOHN_SMITH+news@mail.co.uk, ops-team@sub.example.org", "cc: [EMAIL], [EMAIL]"),
    ("Reply to <a.b-c%d@xn--bcher-kva.ch>.", "Reply to <[EMAIL]>."),
    ("Mail josé.garcía@correo.es or p@q.io", "Mail [EMAIL] or [EMAIL]"),
    # phone: national US formats, international +CC and 00CC, a bare run after a phone word
    (
        "Call me at (415) 555-2671 or 415.555.2671 tomorrow.",
        "Call me at [PHONE] or [PHONE] tomorrow.",
    ),
    ("My cell is 415-555-2671, office +1 212 555 0123.", "My cell is [PHONE], office [PHONE]."),
    ("London +44 20 7946 0958, mobile +44 7400 123456.", "London [PHONE], mobile [PHONE]."),
    ("Berlin 0049 30 901820 or +49 30 901820", "Berlin [PHONE] or [PHONE]"),
    ("Paris: +33 1 42 68 53 00; Mumbai +91 98765 43210", "Paris: [PHONE]; Mumbai [PHONE]"),
    ("Tokyo +81 3-1234-5678, São Paulo +55 11 91234-5678", "Tokyo [PHONE], São Paulo [PHONE]"),
    ("tel: 4155552671", "tel: [PHONE]"),
    ("Text me on +447400123456!", "Text me on [PHONE]!"),
    ("Sydney office +61 2 9374 4000.", "Sydney office [PHONE]."),
    # payment cards: grouped, dashed, plain, 13-19 digits
    ("My card is 4111 1111 1111 1111, exp 12/27.", "My card is [CARD], exp 12/27."),
    ("Amex 3782-822463-10005 and MC 5555555555554444", "Amex [CARD] and MC [CARD]"),
    ("Discover 6011-1111-1111-1117 declined", "Discover [CARD] declined"),
    ("old visa 4222222222222 (13 digits)", "old visa [CARD] (13 digits)"),
    ("Diners 3056 9309 0259 04", "Diners [CARD]"),
    ("order 12345 4111 1111 1111 1111 paid", "order 12345 [CARD] paid"),
    # IP addresses
    ("Server 10.0.0.1 and gateway 192.168.1.254.", "Server [IP] and gateway [IP]."),
    ("curl http://203.0.113.7:8080/health", "curl http://[IP]:8080/health"),
    ("IPv6 2001:db8::8a2e:370:7334 or [2001:db8::1]:443", "IPv6 [IP] or [[IP]]:443"),
    ("link-local fe80::1%eth0, mapped ::ffff:192.0.2.1.", "link-local [IP], mapped [IP]."),
    ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334 and ::1", "full [IP] and [IP]"),
    # names: given + surname, middle initial, particles, apostrophes, accents, possessive
    (
        "Please forward this to Priya Raman before Friday.",
        "Please forward this to [NAME] before Friday.",
    ),
    ("Will Smith and May Johnson joined the call.", "[NAME] and [NAME] joined the call."),
    ("Mary J. Blige met Vincent van Gogh.", "[NAME] met [NAME]."),
    ("Seán O'Brien and Jürgen Müller agreed.", "[NAME] and [NAME] agreed."),
    ("That is John Smith's laptop.", "That is [NAME]'s laptop."),
    ("Ask Wei Zhang or Hiroshi Nakamura.", "Ask [NAME] or [NAME]."),
    ("Paris Hilton and Taylor Swift", "[NAME] and [NAME]"),
    ("Steve Young and Gordon Brown", "[NAME] and [NAME]"),
    (
        "Theresa May met Brian May; we met with Mark Parker.",
        "[NAME] met [NAME]; we met with [NAME].",
    ),
    # names: titles and context
    ("Dr. Okafor reviewed it with Mrs. Chen.", "Dr. [NAME] reviewed it with Mrs. [NAME]."),
    ("Prof Chidi Okonkwo replied.", "Prof [NAME] replied."),
    ("Hi Will, can you check this?", "Hi [NAME], can you check this?"),
    ("Thanks,\nAnna", "Thanks,\n[NAME]"),
    ("Kind regards,\nSven Eriksson", "Kind regards,\n[NAME]"),
    ("My name is Grace Hopper.", "My name is [NAME]."),
    ("I'm Fatima and this is Ingrid.", "I'm [NAME] and this is [NAME]."),
]

POSITIVE_COUNTS: list[tuple[str, dict[str, int]]] = [
    (
        "Hi, I'm Priya Raman (priya.raman@example.com, +1 415 555 2671). My card 4111 1111 "
        "1111 1111 was charged twice from 198.51.100.23; Dr. Okafor said to ask you.",
        {NAME: 2, EMAIL: 1, PHONE: 1, CARD: 1, IP: 1},
    ),
    ("a@b.co c@d.co e@f.co", {EMAIL: 3}),
    ("10.0.0.1 10.0.0.2 ::1", {IP: 3}),
]

# Texts that must come back unchanged: dates, times, prices, versions, order numbers that
# fail Luhn, ids, common words and capitalised phrases that are not people.
NEGATIVE: list[str] = [
    "The meeting is on 2024-11-23 at 14:30:05, or 23/11/2024 08:30, or 11/23/2024.",
    "Deadline 23.11.2024; window 08:00-17:00 UTC; timestamp 2026-11-23T08:00:00Z.",
    "It costs $1,299.99 or €49,90 or USD 12,500.00 (was 1.299,00 EUR).",
    "Upgrade from version 1.2.3.4.5 to 10.0.19041.1; Python 3.11.7; v1.2.3.4; version 1.2.3.4",
    "Order #48392018456 shipped; invoice 2026-000123; Ref 2026112308; order 4155552671.",
    "Order 4111 1111 1111 1112 and 1234 5678 9012 3456 are not cards.",
    "Tracking 1Z999AA10123456784, ISBN 978-3-16-148410-0, SKU 0000 0000 0000 0000.",
    "Batch 7123456789012345678 and id 1234567812345678 processed.",
    "Use std::vector and a::b, at 12:30:45, MAC 00:1A:2B:3C:4D:5E.",
    "Ratio 3:2:1, scores 4.5/5, chapter 3.2.1, section 1.2.3.",
    "Will Kafka scale to a million messages? May I ask a question?",
    "Will May arrive on time? Yes. Will Grant come?",
    "Mark the task as done. Grant Park is lovely. Hope Street is closed. May Day parade.",
    "Apache Kafka, Visual Studio Code, New York, San Francisco and Los Angeles.",
    "Jordan River, Victoria Station, Georgia Tech and Virginia Beach.",
    "Ruby on Rails, Will Power, Rose Bowl, Amber Alert, Summer Olympics.",
    "Alexa Skills and Christian Science Monitor; Crystal Reports; Ruby Tuesday.",
    "Hello World! Thank You. Best Regards. Dear Sir or Madam,",
    "Can you help? The Kafka cluster is down. Do It Now. Hi there.",
    "On Monday January 5 we ship; April showers; June release; August update.",
    "Machine Learning with Python and Java on Google Cloud and Amazon Web Services.",
    "Taylor series, Fourier Transform, Markov Chain, Bayes Theorem.",
    "I am Sure. This is Python. It's Grace period.",
    "Temperature 0.7, top_p 0.95, max_new_tokens 64, seed 1234567.",
    "Room 101, floor 3, building 42, zip 94103, PIN 1234.",
    "the user said call me later; email me; my phone died",
]


@pytest.mark.parametrize(("text", "expected"), POSITIVE)
def test_every_kind_is_replaced(redactor: Redactor, text: str, expected: str) -> None:
    assert redactor.redact(text).text == expected


@pytest.mark.parametrize(("text", "counts"), POSITIVE_COUNTS)
def test_counts(redactor: Redactor, text: str, counts: dict[str, int]) -> None:
    result = redactor.redact(text)
    assert result.counts == counts
    assert result.total == sum(counts.values())
    for kind, n in counts.items():
        assert result.text.count(placeholder(kind)) == n


def test_counts_match_placeholders_everywhere(redactor: Redactor) -> None:
    for text, _ in POSITIVE:
        result = redactor.redact(text)
        for kind in (EMAIL, PHONE, CARD, IP, NAME):
            placed = result.text.count(placeholder(kind)) - text.count(placeholder(kind))
            assert result.counts.get(kind, 0) == placed, text


@pytest.mark.parametrize("text", NEGATIVE)
def test_no_over_redaction(redactor: Redactor, text: str) -> None:
    result = redactor.redact(text)
    assert result.text == text
    assert result.counts == {}


def test_negative_set_is_what_it_claims() -> None:
    """The non-card numbers really fail Luhn or the issuer check (else the test proves
    nothing)."""
    assert not luhn_ok("4111111111111112")
    assert not luhn_ok("1234567890123456")
    assert luhn_ok("1234567812345670") and not luhn_ok("1234567812345678")
    assert luhn_ok("0000000000000000")  # passes Luhn: excluded by the issuer ranges
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")


@pytest.mark.parametrize("text", [t for t, _ in POSITIVE] + [t for t, _ in POSITIVE_COUNTS])
def test_idempotent(redactor: Redactor, text: str) -> None:
    once = redactor.redact(text)
    twice = redactor.redact(once.text)
    assert twice.text == once.text
    assert twice.counts == {}


def test_empty_and_plain(redactor: Redactor) -> None:
    assert redactor.redact("") == RedactionResult("", {})
    assert redactor.redact("no pii here at all") == RedactionResult("no pii here at all", {})
    assert redactor.redact_optional(None) is None
    assert redactor.redact_optional("x@y.io").text == "[EMAIL]"  # type: ignore[union-attr]


def test_kinds_can_be_switched_off() -> None:
    text = "John Smith, john@example.com, 10.0.0.1"
    assert Redactor(kinds=[EMAIL]).redact(text).text == "John Smith, [EMAIL], 10.0.0.1"
    assert Redactor(kinds=[EMAIL, IP]).redact(text).counts == {EMAIL: 1, IP: 1}
    with pytest.raises(ValueError, match="unknown PII kinds"):
        Redactor(kinds=["ssn"])


def test_region_sets_national_formats() -> None:
    text = "Ruf mich an: 030 901820"
    assert Redactor(kinds=[PHONE]).redact(text).text == text  # not a US number
    assert Redactor(region="DE", kinds=[PHONE]).redact(text).text == "Ruf mich an: [PHONE]"


def test_merge_counts() -> None:
    assert merge_counts({NAME: 1}, {}, {NAME: 2, EMAIL: 1}) == {NAME: 3, EMAIL: 1}


def test_name_lists_are_cached() -> None:
    assert name_lexicon() is name_lexicon()
    lexicon = name_lexicon()
    assert lexicon.is_given("Priya") and lexicon.is_given("jürgen")
    assert lexicon.surname("Smith") == 1
    assert not lexicon.is_given("The")  # in the list, but a function word


def test_fast_enough_for_a_stream(redactor: Redactor) -> None:
    text = (
        "Hello, my name is John Smith and you can reach me at (415) 555-2671 or by mail. "
        "I ordered item 48392018 on 2024-11-23 for $129.99 and want a refund to my card "
        "please; Kafka says the broker at 10.0.0.12 is down."
    )
    assert 180 <= len(text) <= 240
    runs = 200
    start = time.perf_counter()
    for _ in range(runs):
        redactor.redact(text)
    per_call = (time.perf_counter() - start) / runs
    assert per_call < 0.005, f"{per_call * 1e6:.0f} µs per call"


# -- secrets, IBANs, national ids, dates of birth, addresses, dotted cards ----------------------

NEW_POSITIVE: list[tuple[str, str]] = [
    # API keys and tokens
    ("key AKIAIOSFODNN7EXAMPLE in the log", "key [API_KEY] in the log"),
    ("GITHUB_TOKEN=ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "GITHUB_TOKEN=[API_KEY]"),
    ("bot xoxb-123456789012-123456789012-AbCdEfGh12 here", "bot [API_KEY] here"),
    ("Authorization: Bearer abc123def456ghi789", "Authorization: Bearer [API_KEY]"),
    (
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9P",
        "jwt [API_KEY]",
    ),
    ('{"api_key": "Zx9Qw8Er7Ty6Ui5Op4As"}', '{"api_key": "[API_KEY]"}'),
    ("why does kP3vX9qL2mN8rT5wY7zB4cF6hJ1dG0sA fail?", "why does [API_KEY] fail?"),
    # IBANs, grouped and compact, several countries
    ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN [IBAN] please"),
    ("to GB82WEST12345698765432.", "to [IBAN]."),
    ("FR14 2004 1010 0505 0001 3M02 606", "[IBAN]"),
    ("NL91ABNA0417164300 thanks", "[IBAN] thanks"),
    # national identity numbers
    ("My SSN is 123-45-6789.", "My SSN is [NATIONAL_ID]."),
    ("NINO: AB123456C", "NINO: [NATIONAL_ID]"),
    ("NI number AB 12 34 56 C", "NI number [NATIONAL_ID]"),
    ("Aadhaar 2345 6789 0124", "Aadhaar [NATIONAL_ID]"),
    ("PAN ABCPE1234F", "PAN [NATIONAL_ID]"),
    ("Mijn BSN is 111222333.", "Mijn BSN is [NATIONAL_ID]."),
    ("NIR 1 85 05 78 006 084 91", "NIR [NATIONAL_ID]"),
    ("Steuer-ID: 12345678901", "Steuer-ID: [NATIONAL_ID]"),
    # dates of birth, with a birth word in several languages
    ("I was born on 12 April 1990.", "I was born on [DOB]."),
    ("DOB: 04/12/1985", "DOB: [DOB]"),
    ("Geburtsdatum: 12.04.1990", "Geburtsdatum: [DOB]"),
    ("née le 3 mars 1975", "née le [DOB]"),
    ("date of birth 1990-04-12", "date of birth [DOB]"),
    # street addresses
    ("I live at 1600 Pennsylvania Avenue NW, Washington", "I live at [ADDRESS], Washington"),
    ("221B Baker Street, London NW1 6XE", "[ADDRESS], London NW1 6XE"),
    ("Hauptstraße 5a, 10115 Berlin", "[ADDRESS], 10115 Berlin"),
    ("10 rue de la Paix, 75002 Paris", "[ADDRESS], 75002 Paris"),
    ("Keizersgracht 123, 1015 CJ Amsterdam", "[ADDRESS], 1015 CJ Amsterdam"),
    ("12 MG Road, Bengaluru 560001", "[ADDRESS], Bengaluru 560001"),
    # cards with dots or double spaces
    ("card 4111.1111.1111.1111 ok", "card [CARD] ok"),
    ("card 5555  5555  5555  4444 ok", "card [CARD] ok"),
    ("amex 3782.822463.10005", "amex [CARD]"),
]

NEW_NEGATIVE: list[str] = [
    "Commit 3f786850e387550fdab836ed7e6dc881de23001b and sha256 9f86d081884c7d659a2feaa0c55ad015",
    "Request id 123e4567-e89b-12d3-a456-426614174000 failed.",
    "Use AbstractSingletonProxyFactoryBean; the token expired; set the api_key variable.",
    "Bearer tokens go in the Authorization header. password must be 12 characters.",
    "An IBAN has up to 34 characters; DE is Germany.",
    "The release is on 12/04/2024; the company was founded on April 12, 1990.",
    "I was born in the 90s.",
    "Baker Street is famous. Turn onto Main Street after 200 metres. Die Hauptstraße ist zu.",
    "ISBN 978-3-16-148410-0; order 123-45-6789; Section 1.2.3.4 of the RFC.",
    "Build 4111.1111.111.11111 and amounts 1.234.567.890.123 EUR.",
    "The population grew from 1393409038 to 1417173173.",
    "Rename MyAppV2Config2025ReleaseBuild and getUser2FactorAuthTokenV2Handler.",
    "Kafka2Partition3Replica1Config and Base64EncodedString2024Version1 are classes.",
]


@pytest.mark.parametrize(("text", "expected"), NEW_POSITIVE)
def test_new_kinds_are_replaced(redactor: Redactor, text: str, expected: str) -> None:
    assert redactor.redact(text).text == expected


@pytest.mark.parametrize("text", NEW_NEGATIVE)
def test_new_kinds_do_not_over_redact(redactor: Redactor, text: str) -> None:
    assert redactor.redact(text).text == text


def test_check_digit_helpers() -> None:
    from streams.redaction import bsn_ok, iban_ok, nir_ok, verhoeff_ok

    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    assert verhoeff_ok("234567890124") and not verhoeff_ok("234567890125")
    assert bsn_ok("111222333") and not bsn_ok("111222334")
    assert nir_ok("185057800608491") and not nir_ok("185057800608492")


def test_new_kinds_have_placeholders_and_counts(redactor: Redactor) -> None:
    text = (
        "SSN 123-45-6789, IBAN GB82WEST12345698765432, born on 1 May 1980, key AKIAIOSFODNN7EXAMPLE"
    )
    result = redactor.redact(text)
    assert result.counts == {NATIONAL_ID: 1, IBAN: 1, DOB: 1, SECRET: 1}
    assert redactor.redact(result.text).text == result.text  # idempotent


# -- pseudonyms --------------------------------------------------------------------------------


def test_pseudonyms_are_keyed_and_cover_every_id() -> None:
    from streams.redaction import Pseudonymizer

    a = Pseudonymizer(b"k" * 32)
    b = Pseudonymizer(b"j" * 32)
    for user in ("jane@example.com", "Jane Doe", "user-123", "42"):
        p = a.pseudonym(user)
        assert p is not None and p.startswith("u-") and len(p) == 26
        assert user not in p
        assert p == a.pseudonym(user)  # stable
        assert p != b.pseudonym(user)  # keyed: another key, another pseudonym
    unsalted = hashlib.sha256(b"jane@example.com").hexdigest()
    assert unsalted[:24] not in (a.pseudonym("jane@example.com") or "")
    assert a.pseudonym(None) is None and a.pseudonym("") is None
    assert "k" * 16 not in repr(a)
    with pytest.raises(ValueError, match="16 bytes"):
        Pseudonymizer(b"short")


def test_pseudonym_key_from_settings(tmp_path: Path) -> None:
    from streams.redaction import Pseudonymizer
    from streams.settings import Settings

    keyed = Settings(home=tmp_path, pseudonym_key="a-secret-of-enough-length")
    expected = hmac.new(b"a-secret-of-enough-length", b"bob", "sha256").hexdigest()[:24]
    assert Pseudonymizer.from_settings(keyed).pseudonym("bob") == "u-" + expected
    assert not (tmp_path / "pseudonym.key").exists()
    with pytest.raises(ValueError, match="16 characters"):
        Pseudonymizer.from_settings(Settings(home=tmp_path, pseudonym_key="short"))


def test_installation_key_when_unset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from streams.redaction import Pseudonymizer
    from streams.settings import Settings

    settings = Settings(home=tmp_path / "home")
    with caplog.at_level("WARNING", logger="streams.redaction"):
        first = Pseudonymizer.from_settings(settings)
    assert "SLUICE_PSEUDONYM_KEY is not set" in caplog.text
    key_file = tmp_path / "home" / "pseudonym.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(key_file.read_bytes()) == 32
    again = Pseudonymizer.from_settings(settings)  # the same installation: the same key
    assert again.pseudonym("bob") == first.pseudonym("bob")
    other = Pseudonymizer.from_settings(Settings(home=tmp_path / "elsewhere"))
    assert other.pseudonym("bob") != first.pseudonym("bob")


# -- the labelled set and its measurement ---------------------------------------------------------

DATA = Path(__file__).parents[1] / "data"


def test_labelled_set_is_big_varied_and_reproducible() -> None:
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("make_set", DATA / "make_redaction_set.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rebuilt = module.build([module.positives(random.Random(module.SEED)), module.negatives()])
    stored = [json.loads(line) for line in (DATA / "redaction_set.jsonl").open(encoding="utf-8")]
    assert rebuilt == stored  # the committed file is what the generator makes
    assert len(stored) >= 200
    assert {"US", "UK", "DE", "FR", "NL", "IN"} <= {s["country"] for s in stored}
    assert sum(s["group"] == "negative" for s in stored) >= 60
    kinds = {span["type"] for s in stored for span in s["spans"]}
    assert kinds == set(KINDS)
    for s in stored:  # every span is inside its text and the labels are real values
        for span in s["spans"]:
            assert 0 <= span["start"] < span["end"] <= len(s["text"])


# Floors measured with `sluice redaction eval` (288 snippets, 244 labelled spans): overall
# recall 98.8 %, precision 99.6 %; the weakest types were address and name (recall 95 %) and
# phone (precision 94.7 %). The floors sit a little below, so a regression fails.
RECALL_FLOOR = {"overall": 0.97, "any type": 0.97}
PRECISION_FLOOR = {"overall": 0.98, "any type": 0.98}
TYPE_RECALL_FLOOR = 0.9
TYPE_PRECISION_FLOOR = 0.9


def test_recall_and_precision_hold_their_floors(redactor: Redactor) -> None:
    from connectors.redaction_eval import evaluate, load_set

    report = evaluate(load_set(DATA / "redaction_set.jsonl"), redactor)
    for kind, score in report.scores.items():
        recall_floor = RECALL_FLOOR.get(kind, TYPE_RECALL_FLOOR)
        precision_floor = PRECISION_FLOOR.get(kind, TYPE_PRECISION_FLOOR)
        assert score.recall >= recall_floor, (kind, score, report.misses)
        assert score.precision >= precision_floor, (kind, score, report.false)


def test_evaluate_counts_hits_misses_and_false_findings(redactor: Redactor) -> None:
    from connectors.redaction_eval import evaluate, format_report

    snippets = [
        {"id": "a", "text": "mail a@b.co now", "spans": [{"start": 5, "end": 11, "type": EMAIL}]},
        {"id": "b", "text": "Damrak 1 is here", "spans": [{"start": 0, "end": 8, "type": ADDRESS}]},
        {"id": "c", "text": "server 10.0.0.1", "spans": []},
    ]
    report = evaluate(snippets, redactor)
    assert (report.scores[EMAIL].found, report.scores[EMAIL].correct) == (1, 1)
    assert report.scores[ADDRESS].missed == 1 and report.scores[ADDRESS].recall == 0.0
    assert report.scores[IP].wrong == 1 and report.scores[IP].precision == 0.0
    overall = report.scores["overall"]
    assert (overall.found, overall.missed, overall.correct, overall.wrong) == (1, 1, 1, 1)
    assert report.misses == [("b", ADDRESS, "Damrak 1")]
    assert report.false == [("c", IP, "10.0.0.1")]
    table = format_report(report, show_errors=True)
    assert "overall" in table and "missed address in b" in table


def test_eval_command_prints_the_table() -> None:
    from typer.testing import CliRunner

    from connectors.cli import app

    result = CliRunner().invoke(
        app, ["redaction", "eval", "--set", str(DATA / "redaction_set.jsonl")]
    )
    assert result.exit_code == 0, result.output
    assert "precision" in result.output and "overall" in result.output
    for kind in KINDS:
        assert kind in result.output
