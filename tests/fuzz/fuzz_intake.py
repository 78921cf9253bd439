"""Coverage-guided fuzzing of the decoder and admission with atheris.

    python tests/fuzz/fuzz_intake.py -max_total_time=600      # longer, on demand

Any exception other than the ones that become dead letters (``SchemaError`` from the
codec, ``InvalidRequestError`` from admission) is a crash: atheris stops and prints the
input. ``tests/unit/test_fuzz_intake.py`` runs it for a bounded time in ``make test``.
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    import atheris

    with atheris.instrument_imports():
        from inference.errors import InvalidRequestError
        from schemas.codec import AvroCodec
        from schemas.errors import SchemaError
        from streams.admission import Admission, AdmissionLimits
        from streams.settings import Settings

    codec = AvroCodec.default()
    admission = Admission(
        AdmissionLimits.from_settings(Settings()),
        served_models=lambda: {"benchmark"},
        encode=lambda p, s, r: [0] * max(1, len(p.split()) + len((s or "").split())),
    )
    now_ms = int(time.time() * 1000)

    def one(data: bytes) -> None:
        try:
            _, record = codec.decode(data, expected="InferenceRequest")
        except SchemaError:
            return
        try:
            admission.admit(record, now_ms)
        except InvalidRequestError:
            return

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
