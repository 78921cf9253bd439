"""Avro schemas and the Confluent-framed codec every Sluice topic uses.

``AvroCodec.default()`` works offline over the shipped schemas; ``codec_from_registry_url``
switches to a Confluent Schema Registry when one is configured.
"""

from schemas.catalog import SchemaCatalog
from schemas.codec import AvroCodec, codec_from_registry_url
from schemas.errors import (
    NotFramedError,
    RegistryError,
    SchemaError,
    SluiceError,
    UnknownSchemaError,
    WrongSchemaError,
)
from schemas.registry import SchemaRegistryResolver

__all__ = [
    "AvroCodec",
    "NotFramedError",
    "RegistryError",
    "SchemaCatalog",
    "SchemaError",
    "SchemaRegistryResolver",
    "SluiceError",
    "UnknownSchemaError",
    "WrongSchemaError",
    "codec_from_registry_url",
]
