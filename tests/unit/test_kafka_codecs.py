"""Every Kafka compression codec can be read: a worker that cannot decompress a record
batch crashes its fetcher (aiokafka's UnsupportedCodecError), and crashes again on every
restart at the same offset, so one producer with ``compression.type=zstd`` (common in Java
clients) would stop the partition for good. ``cramjam`` provides snappy, lz4 and zstd."""

from __future__ import annotations

import pytest
from aiokafka import codec
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

CODECS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


def test_every_codec_is_installed() -> None:
    assert codec.has_gzip() and codec.has_snappy() and codec.has_lz4() and codec.has_zstd()


@pytest.mark.parametrize("name", CODECS)
def test_a_compressed_batch_reads_back(name: str) -> None:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=CODECS[name],
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    builder.append(0, timestamp=None, key=b"k", value=b"v" * 1000, headers=[])
    batch = DefaultRecordBatch(bytes(builder.build()))
    assert [r.value for r in batch] == [b"v" * 1000]
