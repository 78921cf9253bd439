"""Coverage-guided fuzzing of the decoder and admission with atheris.

    python tests/fuzz/fuzz_intake.py -max_total_time=600      # longer, on demand

Any exception other than the ones that become dead letters (``SchemaError`` from the
codec, ``InvalidRequestError`` from admission) is a crash: atheris stops and prints the
input. So is resident memory growing past ``SLUICE_FUZZ_RSS_GROWTH_MB`` (512) over what
the process held after setup: the check reads the *current* RSS, because libFuzzer's own
``-rss_limit_mb`` reads the peak, and Linux carries the peak over from a parent that
spawned us with vfork (a pytest process holding a model reads as a multi-GiB "leak").
``tests/unit/test_fuzz_intake.py`` runs it for a bounded time in ``make test``.
"""

from __future__ import annotations

import os
import sys
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss_mb() -> float:
    """Resident memory now (not the peak), from /proc/self/statm."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


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
    limit_mb = current_rss_mb() + float(os.environ.get("SLUICE_FUZZ_RSS_GROWTH_MB", "512"))
    runs = 0

    def one(data: bytes) -> None:
        nonlocal runs
        runs += 1
        if runs % 1000 == 0 and current_rss_mb() > limit_mb:
            raise MemoryError(f"resident memory {current_rss_mb():.0f} MiB > {limit_mb:.0f} MiB")
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
