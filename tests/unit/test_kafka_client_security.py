"""Every Kafka client the product opens takes the security options from one place.

The TLS/SASL settings reach a client only through ``Settings.kafka_client_options()``
(``streams/security.py``), spread into the constructor as ``**options``. A client built
without that spread would talk plain text to a TLS-only broker, or drop its credentials:
the secure-broker integration tests prove the main clients; this guard catches a new one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = {"AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient"}


def _constructions() -> list[tuple[str, int, bool]]:
    found = []
    for folder in ("streams", "connectors", "inference", "deploy", "schemas"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in CLIENTS:
                    spread = any(k.arg is None for k in node.keywords)
                    found.append((str(path.relative_to(ROOT)), node.lineno, spread))
    return found


def test_every_kafka_client_spreads_the_security_options() -> None:
    found = _constructions()
    assert len(found) >= 10, found  # the scan sees the clients at all
    missing = [f"{path}:{line}" for path, line, spread in found if not spread]
    assert missing == [], f"Kafka clients built without **kafka_client_options(): {missing}"
