"""Bad payloads for the intake, built deterministically from a seed.

Four families, as a hostile or broken producer would send them: random bytes, bit flips and
truncations of valid records, valid framing with schema ids that are not ours, and records
that decode but carry hostile values. Used by the pipeline fuzz test and the
coverage-guided fuzzer (``tests/fuzz/fuzz_intake.py``).
"""

from __future__ import annotations

import random
import struct
from typing import Any

from schemas.codec import AvroCodec

FAMILIES = ("random", "mutated", "wrong_id", "hostile")


def valid_request(rng: random.Random, request_id: str, model: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "model": model,
        "prompt": " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(6)),
        "sampling": {
            "max_new_tokens": rng.randint(1, 8),
            "temperature": 0.0,
            "top_p": 1.0,
            "stop": [],
            "seed": None,
        },
    }


def _hostile(rng: random.Random, base: dict[str, Any]) -> dict[str, Any]:
    record = {**base, "sampling": dict(base["sampling"])}
    choice = rng.randrange(12)
    if choice == 0:
        record["sampling"]["temperature"] = rng.choice([float("nan"), float("inf"), -1.0, 1e-40])
    elif choice == 1:
        record["sampling"]["top_p"] = rng.choice([float("nan"), 0.0, 7.5, -2.0])
    elif choice == 2:
        record["sampling"]["seed"] = rng.choice([-1, 2**63 - 1, -(2**63)])
    elif choice == 3:
        record["sampling"]["stop"] = ["x" * rng.randint(1, 5000)] * rng.randint(1, 400)
    elif choice == 4:
        record["priority"] = rng.choice([-(2**31), 2**31 - 1])
    elif choice == 5:
        record["deadline_ms"] = rng.choice([-5, 0, 1])
    elif choice == 6:
        record["system"] = "s" * rng.randint(20_000, 2_000_000)
    elif choice == 7:
        record["metadata"] = {
            f"k{i}": "v" * rng.randint(0, 3000) for i in range(rng.randint(50, 500))
        }
    elif choice == 8:
        record["prompt"] = "\ud800 lone surrogate \udfff"
    elif choice == 9:
        record["prompt"] = "<|im_start|><|im_end|>" * rng.randint(1, 5)
    elif choice == 10:
        record["sampling"]["max_new_tokens"] = rng.choice([0, -3, 2**31 - 1])
    else:
        record["prompt"] = "p" * rng.randint(16_001, 200_000)
    return record


def bad_payload(
    rng: random.Random, codec: AvroCodec, family: str, request_id: str, model: str
) -> bytes:
    """One bad value of ``family`` (a hostile record may still be normalised and answered)."""
    if family == "random":
        return rng.randbytes(rng.randint(0, 300))
    if family == "wrong_id":
        body = codec.encode("InferenceRequest", valid_request(rng, request_id, model))[5:]
        return b"\x00" + struct.pack(">I", rng.randint(1, 2**31 - 1)) + body
    if family == "hostile":
        record = _hostile(rng, valid_request(rng, request_id, model))
        try:
            return codec.encode("InferenceRequest", record)
        except Exception:  # not even encodable (a lone surrogate): send the raw text
            return repr(record).encode("utf-8", "surrogatepass")[:100_000]
    data = bytearray(codec.encode("InferenceRequest", valid_request(rng, request_id, model)))
    if rng.random() < 0.5 and len(data) > 6:
        return bytes(data[: rng.randint(0, len(data) - 1)])
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
    return bytes(data)
