"""The codec of a process, built from the one settings object.

Every worker, job and CLI command builds its codec here, so the Schema Registry's TLS
(CA, client certificate) and basic auth settings (``streams.security.registry_auth``) are
never honoured by one client and dropped by another.
"""

from __future__ import annotations

from schemas.codec import AvroCodec, codec_from_registry_url
from streams.security import registry_client_conf
from streams.settings import Settings

__all__ = ["codec_from_settings"]


def codec_from_settings(settings: Settings, *, validate: bool = True) -> AvroCodec:
    """A codec over ``settings.schema_registry_url`` with its security settings, or over the
    shipped catalog when no registry is configured. Raises
    :class:`~streams.security.KafkaSecurityError` for unusable registry security settings
    and :class:`~schemas.errors.RegistryError` for a client the registry library refuses."""
    return codec_from_registry_url(
        settings.schema_registry_url,
        client_conf=registry_client_conf(settings),
        validate=validate,
    )
