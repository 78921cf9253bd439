"""PII redaction: every kind in several formats is replaced, nothing else is touched."""

from __future__ import annotations

import time

import pytest

from streams.redaction import (
    CARD,
    EMAIL,
    IP,
    NAME,
    PHONE,
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
