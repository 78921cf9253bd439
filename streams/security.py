"""Client-side Kafka and Schema Registry security: the one place that turns settings into
TLS contexts, aiokafka options and Faust credentials.

Every Kafka client Sluice opens gets its security from here, through
``Settings.kafka_client_options()`` (aiokafka producers, consumers, admin clients) or
:func:`faust_credentials` (the Faust app's ``broker_credentials``), so a TLS setting can
never be honoured by one client and dropped by another.

Rules, checked when the options are built (:class:`KafkaSecurityError` otherwise):

* ``SSL`` and ``SASL_SSL`` always get an :class:`ssl.SSLContext` that verifies the broker's
  certificate and host name (the system CAs, or ``kafka_ssl_cafile`` alone when set);
  ``kafka_ssl_certfile`` (+ ``kafka_ssl_keyfile``, ``kafka_ssl_key_password``) adds a client
  certificate for mutual TLS.
* ``SASL_PLAINTEXT`` and ``SASL_SSL`` need a mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512),
  a user name and a password.
* A TLS or SASL setting next to a protocol that would ignore it is an error, not a silent
  downgrade (a CA file with ``PLAINTEXT`` would otherwise mean plain text).
* The Schema Registry (:func:`registry_auth`, :func:`registry_client_conf`, used by
  ``streams.codecs.codec_from_settings``): the same rules for its CA, client certificate and
  key (a TLS file with an ``http://`` URL is an error) plus basic auth.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import SecretStr

from schemas.errors import SluiceError

if TYPE_CHECKING:
    import faust.auth

    from streams.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "SASL_MECHANISMS",
    "SECURITY_PROTOCOLS",
    "KafkaSecurity",
    "KafkaSecurityError",
    "RegistryAuth",
    "aiokafka_options",
    "faust_credentials",
    "kafka_security",
    "registry_auth",
    "registry_client_conf",
]

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

SECURITY_PROTOCOLS: tuple[str, ...] = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_TLS = ("SSL", "SASL_SSL")
_SASL = ("SASL_PLAINTEXT", "SASL_SSL")


class KafkaSecurityError(SluiceError):
    """The Kafka or Schema Registry security settings are incomplete, contradictory, or
    name files that cannot be used (a configuration problem: retrying does not help)."""

    reason_code = "kafka_security"


@dataclass(frozen=True)
class KafkaSecurity:
    """How a client authenticates to the brokers and protects the connection.

    Built by :func:`kafka_security` from the settings, or directly in tests. Secrets are
    :class:`SecretStr`, so the repr never shows them.
    """

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    key_password: SecretStr | None = None

    @property
    def uses_tls(self) -> bool:
        return self.protocol in _TLS

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in _SASL

    def check(self) -> None:
        """Raise :class:`KafkaSecurityError` unless the settings make one consistent setup."""
        if self.protocol not in SECURITY_PROTOCOLS:
            raise KafkaSecurityError(
                f"kafka_security_protocol must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                f"not {self.protocol!r}"
            )
        if self.uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise KafkaSecurityError(
                    f"{self.protocol} needs kafka_sasl_mechanism = "
                    f"{' | '.join(SASL_MECHANISMS)}, not {self.sasl_mechanism!r}"
                )
            if not self.sasl_username or self.sasl_password is None:
                raise KafkaSecurityError(
                    f"{self.protocol} needs kafka_sasl_username and kafka_sasl_password"
                )
        else:
            given = [
                name
                for name, value in (
                    ("kafka_sasl_mechanism", self.sasl_mechanism),
                    ("kafka_sasl_username", self.sasl_username),
                    ("kafka_sasl_password", self.sasl_password),
                )
                if value is not None
            ]
            if given:
                raise KafkaSecurityError(
                    f"{', '.join(given)} set, but kafka_security_protocol is {self.protocol}, "
                    "which does not authenticate: use SASL_SSL (or SASL_PLAINTEXT)"
                )
        if not self.uses_tls:
            given = [
                name
                for name, value in (
                    ("kafka_ssl_cafile", self.cafile),
                    ("kafka_ssl_certfile", self.certfile),
                    ("kafka_ssl_keyfile", self.keyfile),
                    ("kafka_ssl_key_password", self.key_password),
                )
                if value is not None
            ]
            if given:
                raise KafkaSecurityError(
                    f"{', '.join(given)} set, but kafka_security_protocol is {self.protocol}, "
                    "which is plain text: use SSL or SASL_SSL"
                )
        if self.certfile is None and (self.keyfile is not None or self.key_password is not None):
            raise KafkaSecurityError(
                "kafka_ssl_keyfile / kafka_ssl_key_password need kafka_ssl_certfile "
                "(the client certificate for mutual TLS)"
            )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``SSL``/``SASL_SSL`` (None for the plain-text protocols).

        It verifies the broker's certificate chain and host name; with ``certfile`` it also
        presents a client certificate (mutual TLS)."""
        self.check()
        if not self.uses_tls:
            return None
        return build_ssl_context(
            cafile=self.cafile,
            certfile=self.certfile,
            keyfile=self.keyfile,
            key_password=self.key_password,
            what="Kafka",
        )

    def aiokafka_options(self) -> dict[str, Any]:
        """Keyword arguments for ``AIOKafkaProducer/Consumer/AdminClient`` (and
        ``AIOKafkaClient``): ``security_protocol`` always, SASL and TLS as configured."""
        context = self.ssl_context()  # checks first
        opts: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_sasl:
            assert self.sasl_password is not None  # check() guarantees it
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            opts["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if context is not None:
            opts["ssl_context"] = context
        return opts

    def faust_credentials(self) -> faust.auth.Credentials | None:
        """Faust's ``broker_credentials``: None for PLAINTEXT, ``SSLCredentials`` for SSL,
        ``SASLCredentials`` for SASL (with the TLS context for SASL_SSL, which is what makes
        Faust choose ``SASL_SSL`` rather than SASL over plain text)."""
        import faust

        context = self.ssl_context()  # checks first
        if self.uses_sasl:
            assert self.sasl_password is not None
            credentials: faust.auth.Credentials = faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password.get_secret_value(),
                mechanism=self.sasl_mechanism,
                ssl_context=context,
            )
        elif context is not None:
            credentials = faust.SSLCredentials(context)
        else:
            return None
        return credentials


def build_ssl_context(
    *,
    cafile: Path | None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    key_password: SecretStr | None = None,
    what: str = "Kafka",
) -> ssl.SSLContext:
    """A client TLS context that verifies the server (``cafile`` alone when given, else the
    system's CAs) and, with ``certfile``, presents a client certificate."""
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(cafile) if cafile else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise KafkaSecurityError(f"cannot use the {what} CA file {cafile}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile is not None:
        password = key_password.get_secret_value() if key_password is not None else None
        try:
            context.load_cert_chain(
                str(certfile), str(keyfile) if keyfile else None, password=password
            )
        except (OSError, ssl.SSLError) as exc:
            # never put the password in the message; the library's own text has none
            raise KafkaSecurityError(
                f"cannot load the {what} client certificate {certfile}"
                + (f" with key {keyfile}" if keyfile else "")
                + f": {exc}"
            ) from exc
    return context


def kafka_security(settings: Settings) -> KafkaSecurity:
    """The Kafka security part of ``settings``."""
    return KafkaSecurity(
        protocol=settings.kafka_security_protocol,
        sasl_mechanism=settings.kafka_sasl_mechanism,
        sasl_username=settings.kafka_sasl_username,
        sasl_password=settings.kafka_sasl_password,
        cafile=settings.kafka_ssl_cafile,
        certfile=settings.kafka_ssl_certfile,
        keyfile=settings.kafka_ssl_keyfile,
        key_password=settings.kafka_ssl_key_password,
    )


def aiokafka_options(settings: Settings) -> dict[str, Any]:
    """Security keyword arguments for every aiokafka client (``Settings.kafka_client_options``)."""
    return kafka_security(settings).aiokafka_options()


def faust_credentials(settings: Settings) -> faust.auth.Credentials | None:
    """``broker_credentials`` for ``faust.App`` from ``settings``."""
    return kafka_security(settings).faust_credentials()


@dataclass(frozen=True)
class RegistryAuth:
    """How to reach the Schema Registry: ``verify`` (a TLS context, or True for the system
    CAs), ``basic_auth`` (user, password) or None, and the files behind them. ``conf`` is
    the same for confluent-kafka's ``SchemaRegistryClient`` (which builds its own context
    from the files: ``verify`` is built first so that a bad file fails here, clearly)."""

    verify: ssl.SSLContext | bool
    basic_auth: tuple[str, SecretStr] | None
    ca_file: Path | None
    certfile: Path | None = None
    keyfile: Path | None = None
    key_password: SecretStr | None = None

    def conf(self) -> dict[str, str]:
        """Extra ``SchemaRegistryClient`` configuration (besides ``url``)."""
        conf: dict[str, str] = {}
        if self.ca_file is not None:
            conf["ssl.ca.location"] = str(self.ca_file)
        if self.certfile is not None:
            conf["ssl.certificate.location"] = str(self.certfile)
        if self.keyfile is not None:
            conf["ssl.key.location"] = str(self.keyfile)
        if self.key_password is not None:
            conf["ssl.key.password"] = self.key_password.get_secret_value()
        if self.basic_auth is not None:
            user, password = self.basic_auth
            conf["basic.auth.user.info"] = f"{user}:{password.get_secret_value()}"
        return conf

    def __repr__(self) -> str:
        user = self.basic_auth[0] if self.basic_auth else None
        return f"RegistryAuth(ca_file={self.ca_file!r}, certfile={self.certfile!r}, user={user!r})"


def registry_auth(settings: Settings) -> RegistryAuth:
    """TLS and basic auth for the Schema Registry at ``settings.schema_registry_url``.

    The same rules as for Kafka: a TLS file with an ``http://`` URL is an error (it would
    be ignored), a key or key password needs the client certificate, user and password go
    together, and every file is loaded here (:class:`KafkaSecurityError` naming it)."""
    user = settings.schema_registry_username
    password = settings.schema_registry_password
    if (user is None) != (password is None):
        raise KafkaSecurityError(
            "schema_registry_username and schema_registry_password go together"
        )
    if user is not None and ":" in user:
        raise KafkaSecurityError("schema_registry_username must not contain ':'")
    url = settings.schema_registry_url or ""
    ca = settings.schema_registry_ca_file
    certfile = settings.schema_registry_certfile
    keyfile = settings.schema_registry_keyfile
    key_password = settings.schema_registry_key_password
    if certfile is None and (keyfile is not None or key_password is not None):
        raise KafkaSecurityError(
            "schema_registry_keyfile / schema_registry_key_password need "
            "schema_registry_certfile (the client certificate for mutual TLS)"
        )
    plain = url.startswith("http://")
    if plain:
        given = [
            name
            for name, value in (
                ("schema_registry_ca_file", ca),
                ("schema_registry_certfile", certfile),
                ("schema_registry_keyfile", keyfile),
                ("schema_registry_key_password", key_password),
            )
            if value is not None
        ]
        if given:
            raise KafkaSecurityError(
                f"{', '.join(given)} set, but schema_registry_url {url} is plain http: use https://"
            )
        if user is not None:
            logger.warning(
                "Schema Registry basic auth over plain http (%s): the password travels in clear",
                url,
            )
    verify: ssl.SSLContext | bool = True
    if ca is not None or certfile is not None:
        verify = build_ssl_context(
            cafile=ca,
            certfile=certfile,
            keyfile=keyfile,
            key_password=key_password,
            what="Schema Registry",
        )
    assert password is None or isinstance(password, SecretStr)
    return RegistryAuth(
        verify=verify,
        basic_auth=(user, password) if user is not None and password is not None else None,
        ca_file=ca,
        certfile=certfile,
        keyfile=keyfile,
        key_password=key_password,
    )


def registry_client_conf(settings: Settings) -> dict[str, str]:
    """The ``SchemaRegistryClient`` configuration (besides ``url``) of ``settings``:
    {} without a registry URL (the local catalog needs none)."""
    if not settings.schema_registry_url:
        return {}
    return registry_auth(settings).conf()
