"""Writes ``redaction_set.jsonl``: labelled snippets for measuring the PII redactor.

Deterministic (a fixed seed; no network, no redactor code): run it again and the file comes
out byte for byte the same::

    .venv/bin/python tests/data/make_redaction_set.py

Each line is ``{"id", "text", "spans": [{"start", "end", "type"}], "country", "group"}``.
``type`` is a kind of ``streams.redaction`` (``email``, ``phone``, ``card``, ``ip``, ``name``,
``api_key``, ``iban``, ``national_id``, ``dob``, ``address``). A span covers the value that must
be hidden: the date (not "born on"), the token (not "Bearer"), the name (not "Dr."), the
street line of an address (house number, street name and type; not the city or postcode).
``group`` is ``positive`` or ``negative`` (hard negatives: nothing may be redacted).

Values are generated valid where a check exists (Luhn for cards, mod-97 for IBANs, the key
of a French NIR, the Dutch elfproef, Verhoeff for Aadhaar); phone numbers are numbers of
real numbering plans in the formats people write them, names come from several countries.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

OUT = Path(__file__).with_name("redaction_set.jsonl")
SEED = 20261202


class Snippet:
    """A text assembled from literal parts and labelled values."""

    def __init__(self, country: str, group: str = "positive") -> None:
        self.parts: list[str] = []
        self.spans: list[dict[str, object]] = []
        self.country = country
        self.group = group
        self._len = 0

    def say(self, text: str) -> Snippet:
        self.parts.append(text)
        self._len += len(text)
        return self

    def pii(self, kind: str, value: str) -> Snippet:
        self.spans.append({"start": self._len, "end": self._len + len(value), "type": kind})
        return self.say(value)

    def record(self, index: int) -> dict[str, object]:
        return {
            "id": f"s{index:04d}",
            "text": "".join(self.parts),
            "spans": self.spans,
            "country": self.country,
            "group": self.group,
        }


def build(snippet_fn_groups: list[list[Snippet]]) -> list[dict[str, object]]:
    flat = [s for group in snippet_fn_groups for s in group]
    return [s.record(i) for i, s in enumerate(flat)]


# -- valid values ---------------------------------------------------------------------------


def luhn_digit(partial: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def card_number(rng: random.Random) -> tuple[str, str]:
    issuer = rng.choice(["visa", "mc", "amex", "discover"])
    if issuer == "visa":
        body = "4" + "".join(rng.choices(string.digits, k=14))
    elif issuer == "mc":
        body = rng.choice(["51", "52", "53", "54", "55"]) + "".join(
            rng.choices(string.digits, k=13)
        )
    elif issuer == "amex":
        body = rng.choice(["34", "37"]) + "".join(rng.choices(string.digits, k=12))
    else:
        body = "6011" + "".join(rng.choices(string.digits, k=11))
    return issuer, body + luhn_digit(body)


def format_card(number: str, style: str) -> str:
    groups = (
        [number[:4], number[4:10], number[10:]]
        if len(number) == 15
        else [number[i : i + 4] for i in range(0, len(number), 4)]
    )
    sep = {"plain": "", "space": " ", "dash": "-", "dot": ".", "double": "  "}[style]
    return sep.join(groups)


IBAN_FORMATS = {  # country: (length, BBAN alphabet per position: d digit, a upper letter)
    "DE": "d" * 18,
    "GB": "aaaa" + "d" * 14,
    "FR": "d" * 10 + "a" + "d" * 10 + "dd",
    "NL": "aaaa" + "d" * 10,
    "ES": "d" * 20,
    "IT": "a" + "d" * 10 + "d" * 12,
    "BE": "d" * 12,
    "CH": "d" * 17,
}


def iban(rng: random.Random, country: str) -> str:
    bban = "".join(
        rng.choice(string.digits if kind == "d" else string.ascii_uppercase)
        for kind in IBAN_FORMATS[country]
    )
    moved = bban + country + "00"
    check = 98 - int("".join(str(int(ch, 36)) for ch in moved)) % 97
    return f"{country}{check:02d}{bban}"


def group4(value: str) -> str:
    return " ".join(value[i : i + 4] for i in range(0, len(value), 4))


def ssn(rng: random.Random) -> str:
    area = rng.choice([n for n in range(1, 900) if n != 666])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def nino(rng: random.Random) -> str:
    first = rng.choice("ABCEGHJKLMNPRSTWXYZ")
    second = rng.choice("ABCEGHJKLMNPRSTWXYZ")
    while first + second in {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}:
        second = rng.choice("ABCEGHJKLMNPRSTWXYZ")
    digits = [f"{rng.randint(0, 99):02d}" for _ in range(3)]
    spaced = rng.random() < 0.5
    sep = " " if spaced else ""
    return f"{first}{second}{sep}{sep.join(digits)}{sep}{rng.choice('ABCD')}"


def nir(rng: random.Random) -> str:
    body = (
        f"{rng.choice('12')}{rng.randint(40, 99):02d}{rng.randint(1, 12):02d}"
        f"{rng.randint(1, 95):02d}{rng.randint(1, 999):03d}{rng.randint(1, 999):03d}"
    )
    key = 97 - int(body) % 97
    return f"{body[0]} {body[1:3]} {body[3:5]} {body[5:7]} {body[7:10]} {body[10:13]} {key:02d}"


def bsn(rng: random.Random) -> str:
    while True:
        digits = [rng.randint(0, 9) for _ in range(8)]
        total = sum(d * w for d, w in zip(digits, range(9, 1, -1), strict=True))
        last = total % 11
        if last <= 9 and digits[0] != 0:
            return "".join(map(str, digits)) + str(last)


_VD = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5), (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7), (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3), (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)  # fmt: skip
_VP = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4), (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7), (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)  # fmt: skip
_VINV = (0, 4, 3, 2, 1, 5, 6, 7, 8, 9)


def aadhaar(rng: random.Random) -> str:
    body = str(rng.randint(2, 9)) + "".join(rng.choices(string.digits, k=10))
    check = 0
    for i, ch in enumerate(reversed(body)):
        check = _VD[check][_VP[(i + 1) % 8][int(ch)]]
    return group4(body + str(_VINV[check]))


def pan(rng: random.Random) -> str:
    letters = "".join(rng.choices(string.ascii_uppercase, k=3))
    return f"{letters}{rng.choice('PCHFATBLJG')}{rng.choice(string.ascii_uppercase)}" + (
        f"{rng.randint(1000, 9999)}{rng.choice(string.ascii_uppercase)}"
    )


def token(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    while True:
        value = "".join(rng.choices(alphabet, k=n))
        if (
            any(c.isupper() for c in value)
            and any(c.islower() for c in value)
            and sum(c.isdigit() for c in value) >= 3
        ):
            return value


def b64url(rng: random.Random, n: int) -> str:
    return token(rng, n, string.ascii_letters + string.digits + "-_")


# -- the snippets ---------------------------------------------------------------------------

NAMES = [  # (given, family, country)
    ("Priya", "Raman", "IN"), ("Arjun", "Mehta", "IN"), ("Ananya", "Iyer", "IN"),
    ("Rahul", "Sharma", "IN"), ("Emily", "Clarke", "UK"), ("Oliver", "Bennett", "UK"),
    ("Charlotte", "Hughes", "UK"), ("James", "Whitaker", "UK"), ("Lukas", "Schneider", "DE"),
    ("Anna", "Becker", "DE"), ("Jürgen", "Hoffmann", "DE"), ("Sophie", "Wagner", "DE"),
    ("Camille", "Dubois", "FR"), ("Julien", "Moreau", "FR"), ("Élodie", "Laurent", "FR"),
    ("Thomas", "Lefèvre", "FR"), ("Daan", "Jansen", "NL"), ("Sanne", "de Vries", "NL"),
    ("Lars", "Bakker", "NL"), ("Femke", "Visser", "NL"), ("Michael", "Johnson", "US"),
    ("Jessica", "Martinez", "US"), ("David", "Kim", "US"), ("Sarah", "Thompson", "US"),
]  # fmt: skip
DOMAINS = ["example.com", "mail.co.uk", "web.de", "orange.fr", "ziggo.nl", "gmail.com",
           "rediffmail.com", "company.io"]  # fmt: skip
PHONES = [  # (number as written, country)
    ("(415) 555-2671", "US"), ("415-555-2671", "US"), ("+1 212 555 0123", "US"),
    ("+1 (646) 555-0199", "US"), ("+44 20 7946 0958", "UK"), ("+44 7400 123456", "UK"),
    ("0044 161 496 0000", "UK"), ("+49 30 901820", "DE"), ("+49 89 12345678", "DE"),
    ("0049 40 428280", "DE"), ("+33 1 42 68 53 00", "FR"), ("+33 6 12 34 56 78", "FR"),
    ("+31 20 624 1111", "NL"), ("+31 6 12345678", "NL"), ("+91 98765 43210", "IN"),
    ("+91 22 2202 2222", "IN"), ("+61 2 9374 4000", "AU"), ("+81 3-1234-5678", "JP"),
]  # fmt: skip
ADDRESSES = [  # (street line, rest, country)
    ("1600 Pennsylvania Avenue NW", ", Washington, DC 20500", "US"),
    ("350 Fifth Avenue", ", New York, NY 10118", "US"),
    ("742 Evergreen Terrace", ", Springfield", "US"),
    ("1 Infinite Loop", ", Cupertino, CA 95014", "US"),
    ("4059 Mt Lee Drive", ", Los Angeles, CA 90068", "US"),
    ("221B Baker Street", ", London NW1 6XE", "UK"),
    ("10 Downing Street", ", London SW1A 2AA", "UK"),
    ("14 Queens Road", ", Brighton BN1 3XE", "UK"),
    ("Hauptstraße 5a", ", 10115 Berlin", "DE"),
    ("Goethestraße 12", ", 80336 München", "DE"),
    ("Unter den Linden 77", ", 10117 Berlin", "DE"),
    ("Am Markt 3", ", 28195 Bremen", "DE"),
    ("10 rue de la Paix", ", 75002 Paris", "FR"),
    ("25 avenue Victor Hugo", ", 69002 Lyon", "FR"),
    ("3 place de la Bourse", ", 33000 Bordeaux", "FR"),
    ("Keizersgracht 123", ", 1015 CJ Amsterdam", "NL"),
    ("Coolsingel 40", ", 3011 AD Rotterdam", "NL"),
    ("Damrak 1", ", 1012 LG Amsterdam", "NL"),
    ("12 MG Road", ", Bengaluru 560001", "IN"),
    ("45 Nehru Marg", ", New Delhi 110001", "IN"),
]
DOB_CUES = [  # (before the date, date format, country)
    ("I was born on ", "%d %B %Y", "UK"), ("Date of birth: ", "%m/%d/%Y", "US"),
    ("DOB ", "%Y-%m-%d", "US"), ("born ", "%B %d, %Y", "US"), ("D.O.B.: ", "%d/%m/%Y", "UK"),
    ("Geburtsdatum: ", "%d.%m.%Y", "DE"), ("geboren am ", "%d.%m.%Y", "DE"),
    ("née le ", "%d/%m/%Y", "FR"), ("Date de naissance : ", "%d/%m/%Y", "FR"),
    ("geboortedatum ", "%d-%m-%Y", "NL"), ("my birthday is ", "%d %B %Y", "IN"),
    ("birth date ", "%d-%m-%Y", "IN"),
]  # fmt: skip
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]  # fmt: skip


def fmt_date(rng: random.Random, pattern: str) -> str:
    year, month, day = rng.randint(1940, 2006), rng.randint(1, 12), rng.randint(1, 28)
    return (
        pattern.replace("%Y", str(year))
        .replace("%m", f"{month:02d}")
        .replace("%d", f"{day:02d}" if "%B" not in pattern else str(day))
        .replace("%B", MONTHS[month - 1])
    )


def positives(rng: random.Random) -> list[Snippet]:
    out: list[Snippet] = []
    # names and e-mail addresses
    for given, family, country in NAMES:
        local = f"{given}.{family}".lower().replace(" ", "").replace("ü", "ue").replace("é", "e")
        local = local.replace("è", "e").replace("É", "e").replace("é", "e")
        mail = f"{local}@{rng.choice(DOMAINS)}"
        out.append(
            Snippet(country).say("Hi, I'm ").pii("name", f"{given} {family}")
            .say(", write to ").pii("email", mail).say(" about my order.")
        )  # fmt: skip
    for i, (given, family, country) in enumerate(NAMES[::2]):
        opener = ["Please ask ", "Forward this to ", "Thanks,\n", "Dear Dr. "][i % 4]
        person = family if opener == "Dear Dr. " else f"{given} {family}"
        out.append(
            Snippet(country)
            .say(opener)
            .pii("name", person)
            .say("" if opener == "Thanks,\n" else " before Friday.")
        )
    # phone numbers
    for number, country in PHONES:
        lead = rng.choice(["Call me at ", "My mobile is ", "Reach the office on ", "tel: "])
        out.append(Snippet(country).say(lead).pii("phone", number).say(" after 5pm."))
    # payment cards in every writing style
    for style in ["plain", "space", "dash", "dot", "double"] * 4:
        _, number = card_number(rng)
        out.append(
            Snippet("US").say("Charge my card ").pii("card", format_card(number, style))
            .say(", expiry 09/28.")
        )  # fmt: skip
    # IBANs, grouped and compact
    for country in list(IBAN_FORMATS) * 2:
        value = iban(rng, country)
        written = group4(value) if rng.random() < 0.6 else value
        out.append(
            Snippet(country if country in {"DE", "FR", "NL", "GB"} else "EU")
            .say("Please refund to IBAN ").pii("iban", written).say(" (account holder on file).")
        )  # fmt: skip
    # national identity numbers
    for _ in range(5):
        out.append(Snippet("US").say("My SSN is ").pii("national_id", ssn(rng)).say("."))
        out.append(
            Snippet("UK").say("National Insurance number ").pii("national_id", nino(rng))
            .say(" for payroll.")
        )  # fmt: skip
        out.append(
            Snippet("FR").say("numéro de sécurité sociale : ").pii("national_id", nir(rng))
        )  # fmt: skip
        out.append(Snippet("NL").say("Mijn BSN is ").pii("national_id", bsn(rng)).say("."))
        out.append(Snippet("IN").say("Aadhaar ").pii("national_id", aadhaar(rng)).say(" linked."))
        out.append(Snippet("IN").say("PAN card ").pii("national_id", pan(rng)).say(" attached."))
        steuer = str(rng.randint(1, 9)) + "".join(rng.choices(string.digits, k=10))
        out.append(Snippet("DE").say("Steuer-ID: ").pii("national_id", steuer))
    # dates of birth
    for before, pattern, country in DOB_CUES * 2:
        out.append(
            Snippet(country).say(before).pii("dob", fmt_date(rng, pattern))
            .say(", please update my profile.")
        )  # fmt: skip
    # street addresses
    for street, rest, country in ADDRESSES:
        lead = rng.choice(["Ship it to ", "I live at ", "Our office: ", "Deliver to "])
        out.append(Snippet(country).say(lead).pii("address", street).say(rest + "."))
    # secrets: API keys and tokens
    for _ in range(3):
        aws = "AKIA" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=16))
        out.append(Snippet("US").say("aws_access_key_id = ").pii("api_key", aws))
        out.append(
            Snippet("US").say("export GITHUB_TOKEN=").pii("api_key", "ghp_" + token(rng, 36))
        )
        slack = f"xoxb-{rng.randint(10**11, 10**12)}-{rng.randint(10**11, 10**12)}-{token(rng, 24)}"
        out.append(Snippet("US").say("slack bot token ").pii("api_key", slack).say(" leaked?"))
        jwt = f"eyJ{b64url(rng, 30)}.eyJ{b64url(rng, 40)}.{b64url(rng, 43)}"
        out.append(Snippet("US").say("Authorization: Bearer ").pii("api_key", jwt))
        out.append(
            Snippet("US").say("curl -H 'Authorization: Bearer ").pii("api_key", token(rng, 32))
            .say("' https://api.example.com")
        )  # fmt: skip
        out.append(Snippet("US").say('{"api_key": "').pii("api_key", token(rng, 28)).say('"}'))
        out.append(
            Snippet("US").say("why does this key fail: ").pii("api_key", token(rng, 40))
            .say(" ?")
        )  # fmt: skip
    # IP addresses
    for value in ["10.0.0.1", "192.168.1.254", "203.0.113.7", "2001:db8::8a2e:370:7334",
                  "fe80::1", "198.51.100.23"]:  # fmt: skip
        out.append(Snippet("US").say("login from ").pii("ip", value).say(" blocked"))
    # several kinds in one text
    for given, family, country in NAMES[1::4]:
        _, number = card_number(rng)
        out.append(
            Snippet(country).say("Dear support, this is ").pii("name", f"{given} {family}")
            .say(". My card ").pii("card", format_card(number, "space"))
            .say(" was charged twice; my IBAN is ").pii("iban", group4(iban(rng, "DE")))
            .say(" and I was born on ").pii("dob", fmt_date(rng, "%d %B %Y")).say(".")
        )  # fmt: skip
    return out


NEGATIVES: list[tuple[str, str]] = [  # (text, country)
    ("Order #48392018456 shipped on 2024-11-23.", "US"),
    ("Your order number is 112-4839201-8456345.", "US"),
    ("Invoice INV-2026-000123 is due on 15/01/2026.", "UK"),
    ("Bestellnummer 4711-0815-2026 vom 12.03.2025.", "DE"),
    ("Commande n° 2025-118-4452 expédiée le 3 mars 2025.", "FR"),
    ("Ordernummer 2026112308 is onderweg.", "NL"),
    ("Upgrade from version 1.2.3.4.5 to 10.0.19041.1 today.", "US"),
    ("Python 3.11.7, numpy 1.26.4 and torch 2.5.1 are installed.", "US"),
    ("Kafka 4.4.0 and Scala 2.13.14; build 2026.11.23.1842.", "US"),
    ("Chrome 120.0.6099.109 crashed on Windows 10.0.22631.", "US"),
    ("The release is on 12/04/2024 and the freeze on 2024-03-30.", "US"),
    ("The meeting moved to 3 March 2025 at 14:30.", "UK"),
    ("Termin am 12.04.2025 um 09:00 Uhr.", "DE"),
    ("La réunion du 15/06/2025 est annulée.", "FR"),
    ("De deadline is 01-09-2025.", "NL"),
    ("World War II ended on 2 September 1945.", "UK"),
    ("The company was founded on April 12, 1990 in Ohio.", "US"),
    ("ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2 are in stock.", "US"),
    ("ISBN-13: 9780306406157", "UK"),
    ("We sold 4155552671 units? No, 41,555 units in 2024.", "US"),
    ("The population grew from 1393409038 to 1417173173.", "IN"),
    ("Call the function 3 times with 1234567 iterations.", "US"),
    ("The answer is 42 and pi is 3.14159265358979.", "US"),
    ("Room 101, floor 3, building 42, gate B12.", "UK"),
    ("It costs $1,299.99 or €49,90 or ₹1,49,999.", "IN"),
    ("Tracking 1Z999AA10123456784 via UPS.", "US"),
    ("Commit 3f786850e387550fdab836ed7e6dc881de23001b fixed it.", "US"),
    ("sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "US"),
    ("Request id 123e4567-e89b-12d3-a456-426614174000 failed.", "US"),
    ("Use the class AbstractSingletonProxyFactoryBean from Spring.", "US"),
    ("The variable maxNewTokensPerRequestLimit is too long.", "US"),
    ("Colors #FF5733 and #1A2B3C; font size 14px.", "US"),
    ("Temperature 0.7, top_p 0.95, max_new_tokens 64, seed 1234567.", "US"),
    ("Use std::vector and a::b; MAC 00:1A:2B:3C:4D:5E.", "US"),
    ("Ratio 3:2:1, scores 4.5/5, chapter 3.2.1.", "US"),
    ("Flight LH400 departs at 13:05 from gate Z50.", "DE"),
    ("Train ICE 1234 to Hamburg, seat 45, car 7.", "DE"),
    ("Le TGV 6201 part à 8h15 du quai 3.", "FR"),
    ("Zip code 94103 and area code 415 are in San Francisco.", "US"),
    ("Postcode areas like SW1A cover Westminster.", "UK"),
    ("The street was renamed in 1990.", "UK"),
    ("Baker Street is a famous street in London.", "UK"),
    ("Take the 5th Avenue exit, then Route 66.", "US"),
    ("Turn left onto Main Street after 200 metres.", "US"),
    ("Die Hauptstraße ist gesperrt.", "DE"),
    ("Model GPT-4 and Llama-3-8B compared on 5 tasks.", "US"),
    ("The SSN field must have 9 digits.", "US"),
    ("An IBAN has up to 34 characters; ours starts with DE.", "DE"),
    ("Your IBAN check failed: please try again.", "NL"),
    ("Enter your date of birth in the form below.", "UK"),
    ("I was born in the 90s in Mumbai.", "IN"),
    ("Birthday party on 12/05/2025!", "US"),
    ("The token expired; please log in again.", "US"),
    ("Set the api_key variable in your environment.", "US"),
    ("password must be at least 12 characters", "US"),
    ("Bearer tokens are sent in the Authorization header.", "US"),
    ("The hash function returns aGVsbG8gd29ybGQ= for hello world.", "US"),
    ("Kafka partitions 0-15 on brokers 1,2,3.", "US"),
    ("Account balance 12345.67 EUR at 31.12.2025.", "DE"),
    ("Serial number SN-2026-0042-7781.", "US"),
    ("Patent US 10,123,456 B2 was granted.", "US"),
    ("Part 4111-1111 and part 1111-1112 are compatible.", "US"),
    ("Order 4111 1111 1111 1112 is not a card.", "US"),
    ("Batch 7123456789012345678 processed.", "US"),
    ("The 2024-2025 season had 38 matches.", "UK"),
    ("Will Kafka scale to a million messages per second?", "US"),
    ("May I ask a question about Grant Park?", "US"),
    ("Apache Kafka, Visual Studio Code and New York.", "US"),
    ("Victoria Station and Georgia Tech.", "UK"),
    ("Hello World! Thank You. Best Regards.", "US"),
    ("Taylor series and the Fourier Transform.", "US"),
    ("The Marshall Plan rebuilt Europe.", "US"),
    ("Stock ticker AAPL rose 2.3% to 189.25.", "US"),
    ("Vitamin B12 and omega-3 supplements.", "US"),
    ("Error code 0x80070005 on Windows.", "US"),
    ("HTTP 404 at /api/v1/users/12345/orders/67890.", "US"),
    ("IP range 999.1.1.1 is not valid.", "US"),
    ("Section 1.2.3.4 of the RFC.", "US"),
    ("PIN 1234 is the default; change it.", "UK"),
    ("The box weighs 12.5 kg and measures 40x30x20 cm.", "DE"),
    ("Le numéro de version est 2.4.1.", "FR"),
    ("Het pakket weegt 2,5 kg.", "NL"),
    ("GST rate 18% applies from 01/07/2017.", "IN"),
    ("Pincode lookup is free.", "IN"),
    ("Aadhaar enrolment centres open at 9.", "IN"),
    ("PAN and TAN are Indian tax identifiers.", "IN"),
]


def negatives() -> list[Snippet]:
    return [Snippet(country, "negative").say(text) for text, country in NEGATIVES]


def main() -> None:
    rng = random.Random(SEED)
    records = build([positives(rng), negatives()])
    with OUT.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    spans = sum(len(r["spans"]) for r in records)  # type: ignore[arg-type]
    print(f"wrote {len(records)} snippets ({spans} labelled spans) to {OUT}")


if __name__ == "__main__":
    main()
