"""PII redaction for what we keep: prompts, responses and corrections on llm.training-examples.

``Redactor().redact(text)`` replaces each finding with a typed placeholder and counts them::

    >>> Redactor().redact("Mail jane.doe@example.com or call +44 20 7946 0958").text
    'Mail [EMAIL] or call [PHONE]'

Kinds (``counts`` keys); overlaps are settled in the order of :data:`KINDS` (an earlier kind
wins a contested span; a phone number inside an e-mail address stays part of the address):

``email``  ``local@domain.tld`` (the local part may hold ``. _ % + -``).
``card``   13-19 digits, optionally grouped by single spaces or dashes, passing the Luhn check
           and starting with 2-6 (the issuer ranges of Visa, Mastercard, Amex, Discover, JCB,
           Diners, UnionPay, Maestro). A run of digit groups is searched for its longest such
           window, so an order id next to a card does not hide it. Luhn passes one random
           number in ten, so a 16-digit order id starting 2-6 is still redacted one time in
           ten: an accepted cost for never keeping a card number.
``ip``     IPv4 (dotted quad, validated by :mod:`ipaddress`: no octet over 255, no leading
           zeros) and IPv6 (any form :mod:`ipaddress` accepts: ``::``-compressed, embedded
           IPv4, ``%zone``; with at least one digit, so C++'s ``a::b`` stays). Not
           redacted: a dotted quad inside a longer dotted run (``1.2.3.4.5``), glued to
           letters (``v1.2.3.4``) or after the word version / release / build / rev.
``phone``  Google's libphonenumber (``phonenumbers.PhoneNumberMatcher``, leniency VALID:
           the number must be a valid number of its region, so dates, times, prices and most
           ids are left alone) for the national formats of ``region`` (default ``US``) and
           international ``+CC`` (or ``00CC``) formats of every country. A bare digit run
           without separators (``4155552671``) counts only after a phone word (phone, tel,
           call, mobile, cell, fax, text, whatsapp, ...), and nothing counts after an id
           word (order, invoice, ticket, ref, id, #, ...), so ids are not taken for numbers.
           Only runs of 7+ digits that are not dates reach the matcher (0.1-0.2 ms each).
``name``   person names, see below.
``api_key`` API keys and tokens: AWS access key ids, GitHub, Slack, Stripe, Google, GitLab,
           npm, OpenAI-style keys, JWTs, the value after ``Bearer`` or a secret word
           (``api_key=``, ``password:``, ``token``), and any 24+ character token mixing
           upper case, lower case and digits with the entropy of random base62 (not a hex
           digest, a UUID or a camelCase identifier).
``iban``   IBANs, compact or in groups of four, with the country's length and the mod-97 check.
``national_id`` US SSN (ddd-dd-dddd, valid ranges), UK National Insurance numbers, French NIR
           (with its key), Indian Aadhaar (Verhoeff) and PAN, Dutch BSN (elfproef) and other
           8-12 character ids right after an id word (SSN, BSN, Steuer-ID, passport, ...).
``dob``    a date (numeric, or with a month name in EN/DE/FR/NL) right after a birth word
           (born, date of birth, DOB, geboren, Geburtsdatum, née le, geboortedatum, ...).
           Other dates are left alone.
``address`` street lines: "number + capitalised words + street type" (US, UK, IN), "street
           with a German/Dutch suffix + number" (Hauptstraße 5a, Keizersgracht 123), French
           "number + rue/avenue/boulevard/... + name". City and postcode stay.

Cards may also be written with dots or double spaces, in card groupings (4-4-4-4, 4-6-5).
Measured recall and precision per kind: ``sluice redaction eval`` (docs/data-protection.md).
Pseudonyms for user ids: :class:`Pseudonymizer` (keyed HMAC-SHA256).

Names
-----
Offline only: the name data comes from two small PyPI packages, read as plain data files,
loaded on the first redaction that looks for names (0.3 s, 17 MB resident) and kept for the
process (:func:`name_lexicon`; :meth:`Redactor.warm_up` loads it ahead of time):

* ``gender-guesser`` 0.4.0 (wheel 0.38 MB, data GFDL): ``nam_dict.txt``, 47,780 given names
  from 50+ countries (Europe, the Americas, India, China, Japan, Korea, the Arab world, ...)
  with a popularity step (1-13) per country. The 24,893 above step 1 are kept.
* ``names`` 0.3.0 (sdist 0.79 MB, MIT): the US Census surname list, 88,799 surnames ranked
  by frequency (includes the common Hispanic, Asian and European surnames in the US).

Measured and rejected (2 CPU cores, Python 3.11):

* ``names-dataset`` 3.3.1: the widest coverage (728k given and 984k family names), but a
  55.7 MB wheel, 9.4 s to load and 1.9 GB resident: far too heavy for a stream worker.
  Its lists also hold nearly every capitalised word ("The", "Hello", "Apple", "Paris").
* spaCy / Presidio NER: the official ``en_core_web_*`` models are not on PyPI (only
  unofficial re-uploads of unknown provenance, 12.8 MB, plus spaCy itself); Presidio needs
  one at run time. GLiNER and flair download their models from a hub at run time.
* ``nameparser`` and ``probablepeople`` split a string already known to be a name into its
  parts; they do not find names in running text.

How a name is found (precision first: over-redaction damages the training data). A name
list plus capitalisation alone would take "Will", "May", "Grant" or "Merge Sort" for people,
so a given name is never enough on its own:

1. *Given + family name*: a known given name followed by one to three capitalised words
   (middle names, initials like ``J.``, particles like ``van``/``de``/``al``):
   ``Priya Raman``, ``Mary J. Blige``, ``Vincent van Gogh``, ``Seán O'Brien``. What the
   last word must be depends on the given name: after a popular one (step 4+ somewhere) a
   census surname or any capitalised word that is not a place/product/date noun
   (``Hiroshi Nakamura``, ``Chidi Okonkwo`` would need a title or context: Chidi is not in
   the list); after a rare one (step 2-3) a census surname of rank <= 50,000 (so ``Merge
   Sort`` stays); after an ambiguous one (below) a census surname of rank <= 10,000.
2. *Ambiguous given names*: given names that are also English words, places or products
   (Will, May, Mark, Grant, Hope, Rose, June, Jordan, Paris, Victoria, Alexa, ...): ``Will
   Smith`` and ``May Johnson`` are redacted, ``Will Kafka scale?``, ``May Day`` and ``Grant
   Park`` are not. Nouns like Street, Park, Station, Bank, Day, Code never end a name, and
   function words that the lists hold as names (The, Can, Do, Hi, ...) never count at all.
   After an article nothing counts: ``the Marshall Plan``, ``a Jack Russell Terrier``; nor
   do two ambiguous words opening a sentence (``Will May come?``).
3. *Title*: Mr, Mrs, Ms, Mx, Dr, Prof, Sir, Dame, ... followed by capitalised words:
   ``Dr. Okafor`` -> ``Dr. [NAME]`` (the title stays: it identifies no one).
4. *Context*: a given name (ambiguous ones included) right after a greeting, a sign-off or
   an introduction, with its family name if one follows: ``Hi Will,``, ``Thanks, Rose``,
   ``my name is Grace Hopper``, ``call me Max``, ``Regards,\nAnna``; "I am" / "this is"
   take unambiguous given names only.

Measured on held-out texts (not the unit-test set): 25 requests naming 35 people: 32 found
whole, 1 in part (``Nguyen Van Minh``, family name first), 2 missed (a lone ``Chris``, and
``James`` in "Thanks for your help, James!"); 60 questions full of capitalised non-names
(products, places, books, theorems): 58 untouched, 2 changed (``Harry Potter``, a fictional
person, and ``Hope Diamond``). Limits therefore: lone given names without a cue and lone
family names are missed, and so are names in lower case or capitals and names whose given
name is in neither list; a given name followed by a capitalised word that happens to be a
surname is taken for a person. E-mail addresses spelt ``jane at example dot com`` are not
found.

Cost (2 cores): about 35 µs for a 200-character prompt without digits, 100 µs with a few
numbers and an address, 0.3 ms with a phone number, a card, an e-mail and a name.

Redacting is idempotent: placeholders are upper-case, digit-free and never match again.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import math
import os
import re
import threading
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, NamedTuple

_logger = logging.getLogger(__name__)

EMAIL: Final = "email"
PHONE: Final = "phone"
CARD: Final = "card"
IP: Final = "ip"
NAME: Final = "name"
SECRET: Final = "api_key"
IBAN: Final = "iban"
NATIONAL_ID: Final = "national_id"
DOB: Final = "dob"
ADDRESS: Final = "address"
# Also the priority when spans overlap: an earlier kind wins a contested span.
KINDS: Final = (SECRET, EMAIL, IBAN, NATIONAL_ID, CARD, IP, DOB, PHONE, ADDRESS, NAME)


def placeholder(kind: str) -> str:
    """``[EMAIL]``, ``[PHONE]``, ... for ``kind``."""
    return f"[{kind.upper()}]"


@dataclass(frozen=True, slots=True)
class RedactionResult:
    """The redacted text and how many findings of each kind were replaced (kinds with at
    least one finding only)."""

    text: str
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def merge_counts(*counts: Mapping[str, int]) -> dict[str, int]:
    """Sum of several ``counts`` maps (for a record with several redacted fields)."""
    total: dict[str, int] = {}
    for part in counts:
        for kind, n in part.items():
            total[kind] = total.get(kind, 0) + n
    return total


# -- e-mail ---------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+\-])[\w%+\-]+(?:\.[\w%+\-]+)*@(?:[^\W_](?:[\w\-]*[^\W_])?\.)+[^\W\d_]{2,}(?![\w\-])"
)


# -- payment cards ----------------------------------------------------------------------------

# A run of digit groups separated by one space or dash; windows over its groups are checked.
_DIGIT_RUN = re.compile(r"(?<![\w.,])\d+(?:(?:[ \-.]| {2})\d+)*(?![\w]|[.,]\d)")
# Groupings of card numbers written with dots or double spaces (4-4-4-4, 4-6-5, 4-6-4, ...):
# only these count there, so dotted version strings and amounts are left alone.
_CARD_GROUPINGS = frozenset({(4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4), (4, 4, 4, 1)})
_GROUP = re.compile(r"\d+")


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check used by every payment card number."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _is_card(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits)


def _grouping_ok(text: str, groups: list[tuple[int, int]]) -> bool:
    """Single spaces and dashes take any grouping; dots and double spaces a card's own."""
    seps = {text[a[1] : b[0]] for a, b in itertools.pairwise(groups)}
    if seps <= {" ", "-"}:
        return True
    return len(seps) == 1 and tuple(b - a for a, b in groups) in _CARD_GROUPINGS


def _find_cards(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for run in _DIGIT_RUN.finditer(text):
        if len(run.group()) < 13:
            continue
        groups = [
            (m.start() + run.start(), m.end() + run.start()) for m in _GROUP.finditer(run.group())
        ]
        i = 0
        while i < len(groups):
            best = None
            digits = ""
            for j in range(i, len(groups)):
                digits += text[groups[j][0] : groups[j][1]]
                if len(digits) > 19:
                    break
                if _is_card(digits) and _grouping_ok(text, groups[i : j + 1]):
                    best = j
            if best is None:
                i += 1
            else:
                spans.append((groups[i][0], groups[best][1]))
                i = best + 1
    return spans


# -- IP addresses -----------------------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.%])(?=[0-9A-Fa-f]*:[0-9A-Fa-f]*:)"
    r"[0-9A-Fa-f:]*[0-9A-Fa-f:](?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?:%[\w.\-]+)?(?![\w:]|\.\d)"
)
_VERSION_WORD = re.compile(
    r"(?:\b(?:version|ver|release|build|rev|revision|firmware|v|section|chapter|clause|"
    r"step|figure|fig|table)\.?[\s:]*)$",
    re.IGNORECASE,
)


def _find_ips(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    if text.count(":") >= 2:  # first: an IPv6 address may end in a dotted quad
        for m in _IPV6.finditer(text):
            if not any(ch.isdigit() for ch in m.group()):
                continue  # a::b, dead::beef: code far more often than an address
            try:
                ipaddress.IPv6Address(m.group())
            except ValueError:
                continue
            spans.append(m.span())
    if text.count(".") >= 3:
        for m in _IPV4.finditer(text):
            try:
                ipaddress.IPv4Address(m.group())
            except ValueError:
                continue
            if _VERSION_WORD.search(text, max(0, m.start() - 20), m.start()):
                continue
            spans.append(m.span())
    return spans


# -- phone numbers ----------------------------------------------------------------------------

# Candidates handed to libphonenumber: a digit run with separators, an optional +, 00 or (
# in front and an optional extension. At least 7 digits (checked in code).
_PHONE_CANDIDATE = re.compile(
    r"(?:\+|\b00|\()?\d[\d \t\u00a0().\-/]*\d\)?(?:[ \t]*(?:ext\.?|x|extension)[ \t]*\d{1,6})?",
    re.IGNORECASE,
)
_PHONE_CUE = re.compile(
    r"\b(?:phone|telephone|tel|mobile|mob|cell|cellphone|fax|call|calls|ring|text|sms|"
    r"whatsapp|signal|telegram|contact|reach|dial|number|no|nr|num)\b\.?[\s:#]*(?:me|us|him|"
    r"her|them)?(?:[\s:]*(?:at|on))?[\s:]*$",
    re.IGNORECASE,
)
_ID_CUE = re.compile(
    r"(?:#|\b(?:order|invoice|ticket|ref|reference|id|sku|tracking|transaction|txn|po|"
    r"account|acct|case|item|booking|confirmation|serial|isbn)\b\.?[\s:#]*(?:no\.?|number|"
    r"nr\.?|#)?[\s:#]*)$",
    re.IGNORECASE,
)


@functools.cache
def _phonenumbers():  # type: ignore[no-untyped-def]
    import phonenumbers

    return phonenumbers


_DATE_LIKE = re.compile(
    r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|\d{1,2}:\d{2}(?::\d{2})?"
)


def _find_phones(
    text: str, region: str, taken: list[tuple[int, int, str]]
) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    pn = None
    for cand in _PHONE_CANDIDATE.finditer(text):
        raw = cand.group()
        start, stop = cand.span()
        if len(_DIGIT.findall(raw)) < 7 or _DATE_LIKE.fullmatch(raw.strip()):
            continue
        if any(t_start <= start and stop <= t_end for t_start, t_end, _ in taken):
            continue  # a card or an address already
        before = text[max(0, start - 40) : start]
        if _ID_CUE.search(before):
            continue
        bare = raw.strip().isdigit()
        if bare and not _PHONE_CUE.search(before):
            continue  # a bare digit run is a phone number only where the text says so
        if pn is None:
            pn = _phonenumbers()
        window = raw
        idd = window.startswith("00") and len(window) > 2 and window[2] != "0"
        if idd:
            window = " +" + window[2:]  # 00CC = +CC; same length, so offsets still hold
        # One character either side, so the matcher sees what the number is glued to.
        lo = start - 1 if start > 0 else start
        window = text[lo:start] + window + text[stop : stop + 1]
        for match in pn.PhoneNumberMatcher(window, region, leniency=pn.Leniency.VALID):
            m_start, m_end = lo + match.start, lo + match.end
            if idd and m_start == start + 1:
                m_start = start  # the 00 we turned into " +"
            found = text[m_start:m_end].strip()
            if found.isdigit() and not _PHONE_CUE.search(text, max(0, m_start - 40), m_start):
                continue
            spans.append((m_start, m_end))
    return spans


# -- secrets: API keys and tokens -------------------------------------------------------------

# Fixed formats of the big issuers (their documented prefixes), then bearer tokens and keys
# after a secret word, then any long high-entropy token.
_SECRET_FORMATS = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub fine-grained tokens
    r"|xox[abposr]-[A-Za-z0-9\-]{10,250}"  # Slack tokens
    r"|hooks\.slack\.com/services/[A-Za-z0-9/_\-]{20,}"  # Slack webhook URL path
    r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"  # JWT
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"  # OpenAI / Anthropic style
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API key
    r"|glpat-[A-Za-z0-9_\-]{20}"  # GitLab
    r"|npm_[A-Za-z0-9]{36}"  # npm
    r")(?![A-Za-z0-9])"
)
# The value after a secret word: "Authorization: Bearer <t>", "api_key=<t>", "password: <t>".
_SECRET_CUE = re.compile(
    r"(?:\bbearer|\b(?:api[_\-\s]?key|apikey|access[_\-\s]?key|secret(?:[_\-\s]?key)?|"
    r"client[_\-\s]?secret|auth[_\-\s]?token|access[_\-\s]?token|token|password|passwd|pwd|"
    r"aws_secret_access_key)\b[\"']?\s*[:=]?)\s*[\"']?"
    r"([A-Za-z0-9+/_\-.~]{12,}={0,2})",
    re.IGNORECASE,
)
_LONG_TOKEN = re.compile(r"(?<![\w+/\-.])[A-Za-z0-9+/_\-]{24,}={0,2}(?![\w+/\-])")


_WORDISH = re.compile(r"[A-Z]?[a-z]{3,}")


def _entropy(token: str) -> float:
    """Shannon entropy in bits per character."""
    counts: dict[str, int] = {}
    for ch in token:
        counts[ch] = counts.get(ch, 0) + 1
    n = len(token)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _looks_random(token: str) -> bool:
    """Upper, lower and digits mixed, with the entropy of random base62/base64 (a hex
    digest, a UUID, a camelCase identifier or a word run does not pass)."""
    body = token.rstrip("=")
    if len(body) < 24 or not (
        any(c.isupper() for c in body)
        and any(c.islower() for c in body)
        and sum(c.isdigit() for c in body) >= 2
    ):
        return False
    words = sum(len(w) for w in _WORDISH.findall(body))
    if words >= 0.6 * len(body):
        return False  # camelCase words with digits: an identifier (MyAppV2Config2025Build)
    return _entropy(body) >= 4.3


def _find_secrets(text: str) -> list[tuple[int, int]]:
    spans = [m.span() for m in _SECRET_FORMATS.finditer(text)]
    for m in _SECRET_CUE.finditer(text):
        value = m.group(1)
        if any(ch.isdigit() for ch in value) or len(value) >= 20:
            spans.append(m.span(1))
    for m in _LONG_TOKEN.finditer(text):
        if _looks_random(m.group()):
            spans.append(m.span())
    return spans


# -- IBANs ------------------------------------------------------------------------------------

# Lengths by country (SWIFT IBAN registry), for the countries we see most; any other country
# code takes 15-34 characters and must pass the same mod-97 check.
_IBAN_LENGTHS: Final = {
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18,
    "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22,
    "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18,
    "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TR": 26,
    "AE": 23, "SA": 24, "IL": 23, "BR": 29, "UA": 29,
}  # fmt: skip
_IBAN_CANDIDATE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")


def iban_ok(iban: str) -> bool:
    """The ISO 13616 mod-97 check (``iban`` without spaces, upper case)."""
    moved = iban[4:] + iban[:4]
    digits = "".join(str(int(ch, 36)) for ch in moved)
    return int(digits) % 97 == 1


def _find_ibans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for m in _IBAN_CANDIDATE.finditer(text):
        positions = [m.start() + i for i, ch in enumerate(m.group()) if ch != " "]
        chars = "".join(text[i] for i in positions)
        known = _IBAN_LENGTHS.get(chars[:2])
        lengths = [known] if known else range(min(34, len(chars)), 14, -1)
        for length in lengths:
            if length <= len(chars) and iban_ok(chars[:length]):
                end = positions[length - 1] + 1
                if end < len(text) and text[end].isalnum():
                    continue  # glued to more letters or digits: not this length
                spans.append((m.start(), end))
                break
    return spans


# -- national identity numbers ----------------------------------------------------------------

# Formats specific enough to stand alone (with their check digits where they have one), and
# generic 8-12 digit numbers only right after an id word.
_US_SSN = re.compile(r"(?<![\w\-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w\-])")
_UK_NINO = re.compile(
    r"(?<![A-Za-z0-9])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r"(?: ?\d{2}){3} ?[A-D](?![A-Za-z0-9])"
)
_FR_NIR = re.compile(
    r"(?<![\w])[12] ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?"
    r"(\d{2})(?![\w])"
)
# Not part of a longer digit run (a 16-digit card holds many 12-digit windows).
_IN_AADHAAR = re.compile(
    r"(?<![\w\-])(?<!\d[ \-])[2-9]\d{3}[ \-]?\d{4}[ \-]?\d{4}(?![\w\-])(?![ \-]\d)"
)
_IN_PAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{3}[PCHFATBLJG][A-Z]\d{4}[A-Z](?![A-Za-z0-9])")
_ID_WORD = re.compile(
    r"\b(?:ssn|social\s+security(?:\s+(?:number|no\.?))?|national\s+insurance(?:\s+number)?|"
    r"nino|ni\s+number|bsn|burgerservicenummer|sofinummer|aadhaar|aadhar|uid|"
    r"steuer-?id|steueridentifikationsnummer|idnr|tax\s+id|tin|itin|personalausweis(?:nummer)?|"
    r"num[ée]ro\s+de\s+s[ée]curit[ée]\s+sociale|nir|insee|passport(?:\s+(?:number|no\.?))?|"
    r"id\s+card(?:\s+number)?|national\s+id)\b[\s:#.]*(?:is|=|number|no\.?|nr\.?)?[\s:#]*$",
    re.IGNORECASE,
)
_CUED_ID = re.compile(r"(?<![\w\-])(?:\d[ \-]?){7,11}\d(?![\w\-])|(?<![\w])[A-Z0-9]{8,10}(?!\w)")

_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5), (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7), (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3), (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)  # fmt: skip
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4), (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7), (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)  # fmt: skip


def verhoeff_ok(digits: str) -> bool:
    """The Verhoeff check used by India's Aadhaar numbers."""
    check = 0
    for i, ch in enumerate(reversed(digits)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[i % 8][ord(ch) - 48]]
    return check == 0


def bsn_ok(digits: str) -> bool:
    """The Dutch "elfproef" of a 9-digit burgerservicenummer."""
    if len(digits) != 9:
        return False
    total = sum(int(d) * w for d, w in zip(digits[:8], range(9, 1, -1), strict=True))
    return (total - int(digits[8])) % 11 == 0


def nir_ok(nir: str) -> bool:
    """The French NIR key: 97 - (the first 13 digits mod 97), Corsica's 2A/2B as 19/18."""
    body = nir[:13].replace("2A", "19").replace("2B", "18")
    return body.isdigit() and 97 - int(body) % 97 == int(nir[13:15])


def _find_national_ids(text: str) -> list[tuple[int, int]]:
    spans = [
        m.span()
        for m in _US_SSN.finditer(text)
        if not _ID_CUE.search(text, max(0, m.start() - 40), m.start())
    ]
    spans += [m.span() for m in _UK_NINO.finditer(text)]
    spans += [m.span() for m in _IN_PAN.finditer(text)]
    for m in _FR_NIR.finditer(text):
        if nir_ok(m.group().replace(" ", "")):
            spans.append(m.span())
    for m in _IN_AADHAAR.finditer(text):
        digits = _NON_DIGIT.sub("", m.group())
        if verhoeff_ok(digits) and not _ID_CUE.search(text, max(0, m.start() - 40), m.start()):
            spans.append(m.span())
    for m in _CUED_ID.finditer(text):
        if _ID_WORD.search(text, max(0, m.start() - 40), m.start()):
            value = m.group()
            if value.isalpha():
                continue
            digits = _NON_DIGIT.sub("", value)
            if (
                len(digits) == 9
                and re.search(r"(?i)\b(?:bsn|burgerservice|sofi)", text)
                and (not bsn_ok(digits))
            ):
                continue
            spans.append(m.span())
    return spans


# -- dates of birth ---------------------------------------------------------------------------

_MONTHS = (
    r"jan(?:uary|uar|vier)?|feb(?:ruary|ruar)?|f[ée]v(?:rier)?|mar(?:ch)?|m[äa]rz|mars|"
    r"apr(?:il)?|avr(?:il)?|may|mai|mei|jun[ei]?|juin|jul[iy]?|juil(?:let)?|aug(?:ust)?|"
    r"ao[uû]t|sep(?:t(?:ember|embre)?)?|oct(?:ober|obre)?|okt(?:ober)?|nov(?:ember|embre)?|"
    r"d[ée]c(?:ember|embre)?|dez(?:ember)?"
)
_DATE = (
    r"(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}"  # 1990-04-12
    r"|\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2})"  # 12/04/1990, 04.12.90
    rf"|\d{{1,2}}(?:st|nd|rd|th|er)?\.?[ \-](?:{_MONTHS})\.?[ \-,]+\d{{4}}"  # 12 April 1990
    rf"|(?:{_MONTHS})\.?[ \-]\d{{1,2}}(?:st|nd|rd|th)?,?[ \-]\d{{4}})"  # April 12, 1990
)
_BIRTH_CUE = (
    r"(?:\bborn(?:\s+on)?|\bdate\s+of\s+birth|\bd\.?o\.?b\.?|\bbirth\s*date|\bbirthday"
    r"(?:\s+is)?|\bgeboren(?:\s+am)?|\bgeburtsdatum|\bgeb\.|\bn[ée]e?\s+le|"
    r"\bdate\s+de\s+naissance|\bgeboortedatum|\bgeboren\s+op|\bfecha\s+de\s+nacimiento|"
    r"\bnacido\s+el|\bnacida\s+el)"
)
_DOB = re.compile(
    rf"{_BIRTH_CUE}[\s:,\-]*(?:is\s+|was\s+|on\s+|the\s+)?({_DATE})(?!\d)",
    re.IGNORECASE,
)


def _find_dobs(text: str) -> list[tuple[int, int]]:
    return [m.span(1) for m in _DOB.finditer(text)]


# -- street addresses -------------------------------------------------------------------------

_CAPS = r"[A-ZÀ-ÖØ-Þ][\wÀ-ÿ'\-]*"
_EN_STREET = (
    r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|"
    r"Terrace|Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Close|Crescent|Gardens|Square|Sq|Mews|"
    r"Row|Grove|Walk|Marg|Nagar|Trail|Loop"
)
_ADDRESS = re.compile(
    # US / UK / IN: "1600 Pennsylvania Avenue NW", "221B Baker Street", "12 MG Road"
    rf"(?<![\w\-])\d{{1,5}}[A-Za-z]?,?\s+(?:{_CAPS}\s+){{1,3}}(?:{_EN_STREET})\.?"
    rf"(?:\s+(?:NW|NE|SW|SE|N|S|E|W)\b)?"
    rf"(?:,?\s+(?:Apt|Apartment|Suite|Ste|Unit|Flat|Fl)\.?\s*#?\w{{1,5}})?"
    # DE / NL / AT / CH: "Hauptstraße 5a", "Keizersgracht 123", "Unter den Linden 77"
    r"|(?<![\w\-])[A-ZÄÖÜ][a-zäöüßé\-]*(?:stra(?:ß|ss)e|str\.|weg|platz|gasse|allee|ring|damm|"
    r"ufer|straat|laan|plein|gracht|kade|singel|dijk|steeg)\s+\d{1,4}(?:\s?[a-zA-Z])?(?![\w])"
    r"|(?<![\w\-])(?:Unter\s+den\s+Linden|Am\s+[A-ZÄÖÜ][a-zäöüß]+)\s+\d{1,4}[a-z]?(?![\w])"
    # FR / BE: "10 rue de la Paix", "25 bis avenue Victor Hugo"
    r"|(?<![\w\-])\d{1,4}(?:\s?(?:bis|ter))?,?\s+(?:rue|avenue|av\.|boulevard|bd|place|chemin|"
    r"all[ée]e|impasse|quai|cours|route)\s+(?:(?:de\s+la|de\s+l'|du|des|de|d')\s*)?"
    rf"{_CAPS}(?:[\s\-]+{_CAPS}){{0,3}}",
)


def _find_addresses(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _ADDRESS.finditer(text)]


_NON_DIGIT = re.compile(r"\D")


# -- names ------------------------------------------------------------------------------------

# Words never taken for a name part: function words and sentence starters that the name
# lists hold (gender-guesser has "The", "Can", "Do", "Hi" as given names).
_NEVER = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    out over own same she should so some such than that the their theirs them then there these
    they this those through to too under until up very was we were what when where which while
    who whom why with would you your yours hi hello hey dear thanks thank please yes yeah
    ok okay sure hmm oh well so today tomorrow yesterday tonight every many much one two three
    four five six seven eight nine ten first second last next new old good great best happy
    let lets let's might must shall maybe perhaps per via vs etc san santa santo sao são saint
    los las fort mount port cape
    """.split()
)

# Given names that are also common English words, places or products: alone in front of a
# capitalised word they are not enough; they need a common census surname after them.
_AMBIGUOUS_GIVEN = frozenset(
    """
    will may mark bill grant rose hope joy faith grace art pat chase guy ray don dawn max frank
    jack sunny rich drew miles dean sterling cliff lane page summer autumn winter spring holly
    ivy amber crystal ruby pearl jade violet hazel olive iris lily daisy heather ginger candy
    honey penny sky storm christian major king prince duke earl baron royal price bond case
    clay hunter mason carter cooper parker june april august young long gray grey gold star
    sun moon rain river lake bay paris london berlin rome madrid vienna florence victoria
    sydney austin dallas houston denver phoenix jordan israel india china asia africa america
    europe georgia virginia carolina dakota jersey kent devon lincoln jackson madison
    washington chelsea brooklyn alexa siri cortana julia ada harmony trinity destiny
    charity patience precious unique genesis
    """.split()
)

# Capitalised nouns that the census holds as surnames but that in text mostly name places,
# products, organisations or dates: never the last word of a name.
_NOT_SURNAME = frozenset(
    """
    street road avenue drive court square tower bridge church station city county state
    country university college school hospital center centre bank group inc corp company
    studio code data cloud server service services power energy tech labs lab day days week
    year time morning night house home office room door window table press post news times
    review journal report notes note release version update error test tests build main
    master branch deploy python java kafka docker linux windows apple google microsoft
    amazon apache spark flink redis rust go perl scala kotlin node react angular vue django
    flask rails spring hadoop hive pig beam airflow jenkins github gitlab park parks beach
    island islands river lake bay hill hills valley field fields mountain mountains falls
    airport market mall store shop fund street sunday monday tuesday wednesday thursday
    friday saturday january february march july september october
    november december christmas easter north south east west central upper lower little big
    grand new old high low united national international general special total final free
    open chief head senior junior manager director president minister doctor professor
    captain sergeant officer team staff user users customer customers client admin support
    help question answer thanks regards model models prompt response result results request
    requests feedback label score power skills skill app apps pro plus max mini air
    """.split()
)

# Lower-case particles inside a name: Vincent van Gogh, Maria de la Cruz, Ali bin Said.
_PARTICLES = frozenset(
    "van von de da del della der den di du dos das la le ter ten bin ibn al el st".split()
)
_TITLES = (
    r"Mr|Mrs|Ms|Mx|Miss|Dr|Prof|Professor|Sir|Dame|Lady|Lord|Madam|Madame|Mme|Mlle|Herr|Frau|"
    r"Señor|Señora|Senor|Senora"
)
_UPPER = "".join(ch for ch in map(chr, range(0x2000)) if ch.isupper() and ch.isalpha())
_WORD = r"[^\W\d_]+(?:['\u2019\-][^\W\d_]+)*"
# A word starting with a capital letter (only those can start a name).
_CAP_WORD = re.compile(rf"(?<![\w'\u2019\-])[{_UPPER}][^\W\d_]*(?:['\u2019\-][^\W\d_]+)*")
# The next word of a name: blanks only (a dot first after an initial), no line break.
_NEXT_WORD = re.compile(rf"\.?[ \t\u00a0]{{1,3}}({_WORD})")
_TITLE_BEFORE = re.compile(rf"\b(?:{_TITLES})\.?[ \t]+$")
# Cue (case-insensitive) right before a given name. Strong cues take ambiguous given names
# too; weak ones (I am, this is) only unambiguous ones.
_STRONG_CUE = re.compile(
    r"\b(?:hi|hello|hey|dear|thanks|thank\s+you|cheers|regards|sincerely|bye|greetings|"
    r"yours|love|my\s+name\s+is|my\s+name's|name\s*:|call\s+me|signed|attn|attention|"
    r"ask\s+for|contact)[ \t]*[,:]?[ \t]*\n?[ \t]*$",
    re.IGNORECASE,
)
_WEAK_CUE = re.compile(r"\b(?:i\s+am|i['\u2019]m|this\s+is|it['\u2019]s)[ \t]+$", re.IGNORECASE)

_SENTENCE_END = re.compile(r"[.!?:;\n][\"')\]\u201d]*\s+$")
_ARTICLE_BEFORE = re.compile(r"\b(?:the|a|an)[ \t]+$", re.IGNORECASE)

# How the last word of a name is judged, by the given name in front of it:
_AMBIGUOUS = 0  # Will, May, Grant, Paris, ...: a common census surname (rank <= 10,000)
_RARE = 1  # popularity 2-3 (of 13) in the given-name list: a census surname (rank <= 50,000)
_COMMON = 2  # popularity >= 4: a census surname, or any word that is not a given-name word
_SURNAME_RANK = {_AMBIGUOUS: 10_000, _RARE: 50_000}
_MIN_POPULARITY = 2  # the bottom step (1) of the scale holds too many words
_COMMON_POPULARITY = 4


@dataclass(frozen=True, slots=True)
class NameLexicon:
    """Given names (with their popularity, 2..13) and census surnames (with their rank),
    case-folded; accented words are also looked up without their accents."""

    given: dict[str, int]
    surname_rank: dict[str, int]

    def popularity(self, word: str) -> int:
        """0 for a word that is not a given name."""
        key = word.casefold()
        return self.given.get(key) or self.given.get(_fold(key), 0)

    def is_given(self, word: str) -> bool:
        return self.popularity(word) > 0

    def surname(self, word: str) -> int | None:
        """The census rank (1 = Smith), or None."""
        return self.surname_rank.get(_fold(word.casefold()))


def _fold(word: str) -> str:
    if word.isascii():
        return word
    return "".join(
        ch for ch in unicodedata.normalize("NFKD", word) if not unicodedata.combining(ch)
    )


_LEXICON_LOCK = threading.Lock()


@functools.cache
def _load_lexicon() -> NameLexicon:
    given: dict[str, int] = {}

    def add(name: str, popularity: int) -> None:
        if given.get(name, 0) < popularity:
            given[name] = popularity

    data = resources.files("gender_guesser").joinpath("data", "nam_dict.txt")
    with data.open(encoding="utf-8") as lines:
        for line in lines:
            if line[0] in "#=":
                continue
            line = line.strip()
            popularity = max((int(ch, 16) for ch in line[30:-1] if ch != " "), default=0)
            if popularity < _MIN_POPULARITY:
                continue
            name = line.split()[1].casefold()
            if "+" in name:
                for sep in ("", " ", "-"):
                    add(name.replace("+", sep), popularity)
            else:
                add(name, popularity)
                add(_fold(name), popularity)
    ranks: dict[str, int] = {}
    census = resources.files("names").joinpath("dist.all.last")
    with census.open(encoding="ascii") as lines:
        for line in lines:
            parts = line.split()
            if len(parts) == 4:
                ranks[parts[0].casefold()] = int(parts[3])
    for word in _NEVER:
        given.pop(word, None)
        ranks.pop(word, None)
    return NameLexicon(given, ranks)


def name_lexicon() -> NameLexicon:
    """The name lists, loaded on first use (thread-safe) and kept for the process."""
    with _LEXICON_LOCK:
        return _load_lexicon()


class _Tok(NamedTuple):
    start: int
    end: int
    text: str
    possessive: bool  # "'s" was cut off: the name ends here


def _tok(start: int, word: str) -> _Tok:
    if len(word) > 2 and word[-2] in "'\u2019" and word[-1] in "sS":
        return _Tok(start, start + len(word) - 2, word[:-2], True)
    return _Tok(start, start + len(word), word, False)


def _capitalised(word: str) -> bool:
    return word[0].isupper() and any(ch.islower() for ch in word[1:])


def _is_initial(tok: _Tok, text: str) -> bool:
    return len(tok.text) == 1 and tok.text.isupper() and text[tok.end : tok.end + 1] == "."


def _name_tail(text: str, first: _Tok) -> list[_Tok]:
    """The words after ``first`` that may continue a name (at most 3), ending on a
    capitalised word (not on an initial or a particle)."""
    tail: list[_Tok] = []
    prev = first
    while len(tail) < 3 and not prev.possessive:
        m = _NEXT_WORD.match(text, prev.end)
        if m is None or (m.group().startswith(".") and not _is_initial(prev, text)):
            break
        tok = _tok(m.start(1), m.group(1))
        key = tok.text.casefold()
        if _is_initial(tok, text) or key in _PARTICLES:
            tail.append(tok)
        elif _capitalised(tok.text) and key not in _NEVER and key not in _NOT_SURNAME:
            tail.append(tok)
        else:
            break
        prev = tok
    while tail and (_is_initial(tail[-1], text) or tail[-1].text.casefold() in _PARTICLES):
        tail.pop()
    return tail


def _strength(lex: NameLexicon, word: str) -> int:
    if word.casefold() in _AMBIGUOUS_GIVEN:
        return _AMBIGUOUS
    return _COMMON if lex.popularity(word) >= _COMMON_POPULARITY else _RARE


def _surname_ok(lex: NameLexicon, word: str, strength: int) -> bool:
    key = word.casefold()
    if key in _NEVER or key in _NOT_SURNAME:
        return False
    rank = lex.surname(word)
    if strength == _COMMON:
        return rank is not None or key not in _AMBIGUOUS_GIVEN
    return rank is not None and rank <= _SURNAME_RANK[strength]


def _find_names(text: str, lex: NameLexicon) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    covered = 0  # end of the last span: words inside it are not looked at again
    for m in _CAP_WORD.finditer(text):
        if m.start() < covered:
            continue
        tok = _tok(m.start(), m.group())
        if not _capitalised(tok.text) or tok.text.casefold() in _NEVER:
            continue
        before = text[max(0, tok.start - 40) : tok.start]
        end = 0
        if _TITLE_BEFORE.search(before):  # 3. title + capitalised words
            tail = _name_tail(text, tok)
            end = tail[-1].end if tail else tok.end
        elif lex.is_given(tok.text):
            tail = _name_tail(text, tok)
            strength = _strength(lex, tok.text)
            if _STRONG_CUE.search(before) or (strength != _AMBIGUOUS and _WEAK_CUE.search(before)):
                # 4. context: greeting, sign-off, introduction; a surname may follow
                end = tok.end
                if tail and _surname_ok(lex, tail[-1].text, _COMMON):
                    end = tail[-1].end
            elif tail and _ARTICLE_BEFORE.search(before):
                # Not after an article: "the Marshall Plan", "a Jack Russell Terrier" are
                # not people; nor is any part of them.
                covered = tail[-1].end
            elif tail:
                # 1./2. given name + surname: the longest tail that ends on a surname. Two
                # ambiguous words opening a sentence are a question ("Will May come?").
                opening = strength == _AMBIGUOUS and (
                    (tok.start <= 40 and not before.strip()) or _SENTENCE_END.search(before)
                )
                for last in reversed(tail):
                    if opening and last.text.casefold() in _AMBIGUOUS_GIVEN:
                        continue
                    if _surname_ok(lex, last.text, strength):
                        end = last.end
                        break
        if end:
            spans.append((tok.start, end))
            covered = end
    return spans


# -- the redactor -----------------------------------------------------------------------------


class Redactor:
    """Finds and replaces PII; see the module docstring for what and how.

    ``region``: ISO country whose national phone formats are recognised (international
    ``+CC`` formats are recognised for every country). ``kinds``: which kinds to redact.
    Thread-safe; build one per process and reuse it.
    """

    def __init__(self, *, region: str = "US", kinds: Iterable[str] = KINDS) -> None:
        wanted = set(kinds)
        unknown = wanted - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        self.region = region.upper()
        self.kinds = tuple(kind for kind in KINDS if kind in wanted)

    def warm_up(self) -> None:
        """Load the name lists and phone metadata now rather than on the first record."""
        if NAME in self.kinds:
            name_lexicon()
        if PHONE in self.kinds:
            self.redact("+1 650 253 0000")

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """``(start, end, kind)`` of every finding, sorted, without overlaps."""
        if not text:
            return []
        taken: list[tuple[int, int, str]] = []
        digits = len(_DIGIT.findall(text))  # cards need 13, phone numbers 7
        for kind in self.kinds:
            if kind == SECRET:
                spans = _find_secrets(text) if len(text) >= 12 else []
            elif kind == EMAIL:
                spans = [m.span() for m in _EMAIL.finditer(text)] if "@" in text else []
            elif kind == IBAN:
                spans = _find_ibans(text) if digits >= 4 else []
            elif kind == NATIONAL_ID:
                spans = _find_national_ids(text) if digits >= 4 else []
            elif kind == DOB:
                spans = _find_dobs(text) if digits >= 4 else []
            elif kind == ADDRESS:
                spans = _find_addresses(text) if digits >= 1 else []
            elif kind == CARD:
                spans = _find_cards(text) if digits >= 13 else []
            elif kind == IP:
                spans = _find_ips(text) if digits >= 2 else []
            elif kind == PHONE:
                spans = _find_phones(text, self.region, taken) if digits >= 7 else []
            else:
                spans = _find_names(text, name_lexicon()) if _has_capital(text) else []
            for start, end in spans:
                if not any(start < t_end and t_start < end for t_start, t_end, _ in taken):
                    taken.append((start, end, kind))
        taken.sort()
        return taken

    def redact(self, text: str) -> RedactionResult:
        """``text`` with each finding replaced by its placeholder, and the counts."""
        found = self.find(text)
        if not found:
            return RedactionResult(text, {})
        parts: list[str] = []
        counts: dict[str, int] = {}
        pos = 0
        for start, end, kind in found:
            parts.append(text[pos:start])
            parts.append(placeholder(kind))
            counts[kind] = counts.get(kind, 0) + 1
            pos = end
        parts.append(text[pos:])
        return RedactionResult("".join(parts), counts)

    def redact_optional(self, text: str | None) -> RedactionResult | None:
        """:meth:`redact` for optional fields: None stays None."""
        return None if text is None else self.redact(text)


_DIGIT = re.compile(r"\d")
_CAPITAL = re.compile(f"[{_UPPER}]")


def _has_capital(text: str) -> bool:
    return _CAPITAL.search(text) is not None


# -- pseudonyms -------------------------------------------------------------------------------

PSEUDONYM_KEY_FILE: Final = "pseudonym.key"
_PSEUDONYM_KEY_BYTES = 32


class Pseudonymizer:
    """Keyed pseudonyms for user ids: ``u-`` + the first 24 hex digits (96 bits) of
    HMAC-SHA256(key, user id).

    Every id is hashed, whatever it looks like: an id that looks pseudonymous may still be
    an account number. Without the key nobody can test a guessed e-mail address against a
    pseudonym (an unsalted SHA-256 of an address is reversed by hashing a list of addresses);
    with the same key the same user always gets the same pseudonym, so feedback by one user
    can still be grouped. Build it with :meth:`from_settings`.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a pseudonym key needs at least 16 bytes")
        self._key = key

    def __repr__(self) -> str:  # never print the key
        return "Pseudonymizer(<key>)"

    def pseudonym(self, user: str | None) -> str | None:
        """The pseudonym of ``user``; None or an empty id stays None."""
        if not user:
            return None
        import hmac

        digest = hmac.new(self._key, user.encode("utf-8", "surrogatepass"), "sha256")
        return "u-" + digest.hexdigest()[:24]

    @classmethod
    def from_settings(cls, settings: Any) -> Pseudonymizer:
        """The key from ``settings.pseudonym_key`` (``SLUICE_PSEUDONYM_KEY``); unset: this
        installation's own key (:func:`installation_key`), with a warning."""
        secret = getattr(settings, "pseudonym_key", None)
        if secret is not None:
            value = secret.get_secret_value().encode()
            if len(value) < 16:
                raise ValueError("SLUICE_PSEUDONYM_KEY must be at least 16 characters")
            return cls(value)
        home = Path(settings.home)
        _logger.warning(
            "SLUICE_PSEUDONYM_KEY is not set: user pseudonyms use this installation's own key "
            "(%s); other installations give the same user other pseudonyms",
            home / PSEUDONYM_KEY_FILE,
        )
        return cls(installation_key(home))


def installation_key(home: Path) -> bytes:
    """The key stored in ``home/pseudonym.key``, created (32 random bytes, mode 0600) on
    first use. Each installation has its own: workers on other machines (or with another
    home) give the same user another pseudonym, so set ``SLUICE_PSEUDONYM_KEY`` wherever
    more than one worker writes training examples."""
    path = home / PSEUDONYM_KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        import secrets

        home.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(_PSEUDONYM_KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process won the race: use its key
            key = path.read_bytes()
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(key)
            _logger.info("created the pseudonym key %s", path)
    if len(key) < 16:
        raise ValueError(f"{path} holds {len(key)} bytes; a pseudonym key needs 16 or more")
    return key
