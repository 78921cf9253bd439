"""The Schema Registry over HTTPS with mutual TLS and basic auth, end to end through the real
``SchemaRegistryClient``: ``codec_from_settings`` passes the CA, the client certificate and
the credentials; missing or wrong ones fail with an error that says what to fix.

The registry is a small HTTPS server on 127.0.0.1 speaking the Confluent REST endpoints the
resolver uses (register, look up, get by id: ``StubRegistry``), that requires a client
certificate signed by the test CA and HTTP basic auth. Certificates come from
``deploy.security.certs`` (what ``sluice kafka up --secure`` uses). A real Schema Registry
cannot run here: Confluent's is not on Maven Central, and Karapace is not installable from
this machine's package index.
"""

from __future__ import annotations

import base64
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from deploy.security.certs import CertificateAuthority
from schemas.errors import RegistryError, RegistryUnavailableError
from schemas.registry import SchemaRegistryResolver, adecode, awarm_up
from streams.codecs import codec_from_settings
from streams.security import KafkaSecurityError, registry_auth
from streams.settings import Settings
from tests.unit.test_schemas_registry import StubRegistry

pytest.importorskip("confluent_kafka.schema_registry")

USER = "sluice-registry"
PASSWORD = "registry-password-0123"
KEY_PASSWORD = "client-key-password-0123"
FAST = {"max.retries": 0, "timeout": 5}


@dataclass
class Pki:
    ca: Path
    server: Path  # key + cert
    client_cert: Path
    client_key: Path  # encrypted with KEY_PASSWORD
    other_ca: Path  # a CA that signed nothing here
    stranger_cert: Path  # a client certificate from other_ca (key in the same file)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("registry-pki"))


def make_pki(root: Path) -> Pki:
    """A CA, the registry's certificate, a client certificate (CN sluice-worker, encrypted
    key) and a stranger's, as PEM files under ``root``."""
    ca = CertificateAuthority.create("registry test CA")
    server = ca.issue("registry", hosts=("127.0.0.1", "localhost"), server=True)
    client = ca.issue("sluice-worker", server=False, client=True, key_password=KEY_PASSWORD)
    other = CertificateAuthority.create("someone else's CA")
    stranger = other.issue("stranger", server=False, client=True)
    files = {
        "ca.pem": ca.cert_pem,
        "server.pem": server.key_pem + server.cert_pem,
        "client.pem": client.cert_pem,
        "client-key.pem": client.key_pem,
        "other-ca.pem": other.cert_pem,
        "stranger.pem": stranger.key_pem + stranger.cert_pem,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return Pki(
        ca=root / "ca.pem",
        server=root / "server.pem",
        client_cert=root / "client.pem",
        client_key=root / "client-key.pem",
        other_ca=root / "other-ca.pem",
        stranger_cert=root / "stranger.pem",
    )


class SecureRegistry:
    """HTTPS, client certificate required (signed by ``pki.ca``), basic auth required."""

    def __init__(self, pki: Pki) -> None:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, client CN
        outer = self

        class Handler(StubRegistry):
            schemas: dict[int, str] = {}
            subjects: dict[tuple[str, str], int] = {}

            def _authorized(self) -> bool:
                peer = self.connection.getpeercert()  # type: ignore[attr-defined]
                cn = next(
                    (
                        v
                        for rdn in (peer or {}).get("subject", ())
                        for k, v in rdn
                        if k == "commonName"
                    ),
                    None,
                )
                outer.requests.append((self.command, self.path, cn))
                if self.headers.get("Authorization") != expected:
                    self._reply(401, {"error_code": 40101, "message": "Unauthorized"})
                    return False
                return True

            def do_GET(self) -> None:
                if self._authorized():
                    super().do_GET()

            def do_POST(self) -> None:
                if self._authorized():
                    super().do_POST()

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(str(pki.server))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> SecureRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@pytest.fixture
def registry(pki: Pki) -> Iterator[SecureRegistry]:
    with SecureRegistry(pki) as server:
        yield server


def _settings(registry: SecureRegistry, pki: Pki, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "schema_registry_url": registry.url,
        "schema_registry_ca_file": pki.ca,
        "schema_registry_certfile": pki.client_cert,
        "schema_registry_keyfile": pki.client_key,
        "schema_registry_key_password": SecretStr(KEY_PASSWORD),
        "schema_registry_username": USER,
        "schema_registry_password": SecretStr(PASSWORD),
    }
    fields.update(overrides)
    return Settings(**{k: v for k, v in fields.items() if v is not None})


def _fast(settings: Settings) -> SchemaRegistryResolver:
    """The resolver ``codec_from_settings`` builds, with retries off (fast failures)."""
    from streams.security import registry_client_conf

    assert settings.schema_registry_url
    return SchemaRegistryResolver(
        settings.schema_registry_url, client_conf={**registry_client_conf(settings), **FAST}
    )


async def test_right_certificate_and_credentials_register_and_fetch(
    registry: SecureRegistry, pki: Pki
) -> None:
    settings = _settings(registry, pki)
    producer = codec_from_settings(settings)
    await awarm_up(producer, ("InferenceRequest",))  # registers, in a thread
    record = {"request_id": "r", "prompt": "over mTLS", "created_at": 1_700_000_000_000}
    encoded = producer.encode("InferenceRequest", record)

    consumer = codec_from_settings(settings)  # fresh caches: GET /schemas/ids/1 over HTTPS
    name, decoded = await adecode(consumer, encoded, expected="InferenceRequest")
    assert name == "InferenceRequest" and decoded["prompt"] == "over mTLS"
    methods = [(method, path.split("?")[0]) for method, path, _ in registry.requests]
    assert ("POST", "/subjects/dev.sluice.InferenceRequest/versions") in methods
    assert ("GET", "/schemas/ids/1") in methods
    assert {cn for _, _, cn in registry.requests} == {"sluice-worker"}, "client cert presented"


@pytest.mark.parametrize(
    "credentials",
    [
        {"schema_registry_username": None, "schema_registry_password": None},
        {"schema_registry_password": SecretStr("not-the-password")},
    ],
    ids=["no-credentials", "wrong-password"],
)
def test_missing_or_wrong_credentials_are_a_configuration_error(
    registry: SecureRegistry, pki: Pki, credentials: dict[str, Any]
) -> None:
    resolver = _fast(_settings(registry, pki, **credentials))
    with pytest.raises(RegistryError) as caught:
        resolver.id_for("InferenceRequest")
    assert not isinstance(caught.value, RegistryUnavailableError)
    assert caught.value.retriable is False  # a 401 is not an outage: retrying never heals it
    assert "401" in str(caught.value) and "credentials" in str(caught.value)
    assert "not-the-password" not in str(caught.value)
    assert registry.requests, "the request reached the registry (TLS was fine)"


NO_CLIENT_CERT = {
    "schema_registry_certfile": None,
    "schema_registry_keyfile": None,
    "schema_registry_key_password": None,
}


@pytest.mark.parametrize(
    "case", ["no-client-certificate", "client-certificate-of-another-ca", "wrong-ca"]
)
def test_tls_failures_are_configuration_errors(
    registry: SecureRegistry, pki: Pki, case: str
) -> None:
    fields: dict[str, Any] = {
        "no-client-certificate": NO_CLIENT_CERT,
        "client-certificate-of-another-ca": {
            **NO_CLIENT_CERT,
            "schema_registry_certfile": pki.stranger_cert,
        },
        "wrong-ca": {"schema_registry_ca_file": pki.other_ca},
    }[case]
    resolver = _fast(_settings(registry, pki, **fields))
    with pytest.raises(RegistryError) as caught:
        resolver.id_for("InferenceRequest")
    assert caught.value.retriable is False, caught.value
    assert "TLS" in str(caught.value), caught.value
    assert not registry.requests, "no HTTP request got through"


def test_plain_http_to_an_https_registry_fails_clearly(registry: SecureRegistry, pki: Pki) -> None:
    url = f"http://127.0.0.1:{registry.port}"
    settings = Settings(
        schema_registry_url=url,
        schema_registry_username=USER,
        schema_registry_password=SecretStr(PASSWORD),
    )
    resolver = _fast(settings)
    with pytest.raises(RegistryError) as caught:
        resolver.id_for("InferenceRequest")
    assert "https://" in str(caught.value), caught.value
    assert not registry.requests


def test_tls_settings_with_an_http_url_are_refused(pki: Pki) -> None:
    with pytest.raises(KafkaSecurityError, match="plain http: use https://"):
        codec_from_settings(
            Settings(schema_registry_url="http://127.0.0.1:1", schema_registry_ca_file=pki.ca)
        )
    with pytest.raises(KafkaSecurityError, match="need schema_registry_certfile"):
        registry_auth(
            Settings(schema_registry_url="https://127.0.0.1:1", schema_registry_keyfile=pki.ca)
        )


def test_unusable_files_fail_when_the_codec_is_built(pki: Pki, tmp_path: Path) -> None:
    url = "https://127.0.0.1:1"
    with pytest.raises(KafkaSecurityError, match="Schema Registry CA file"):
        codec_from_settings(
            Settings(schema_registry_url=url, schema_registry_ca_file=tmp_path / "missing.pem")
        )
    with pytest.raises(KafkaSecurityError, match="Schema Registry client certificate") as caught:
        codec_from_settings(
            Settings(
                schema_registry_url=url,
                schema_registry_ca_file=pki.ca,
                schema_registry_certfile=pki.client_cert,
                schema_registry_keyfile=pki.client_key,
                schema_registry_key_password=SecretStr("wrong-key-password"),
            )
        )
    assert "wrong-key-password" not in str(caught.value)


def test_secrets_stay_out_of_reprs(pki: Pki) -> None:
    auth = registry_auth(
        Settings(
            schema_registry_url="https://127.0.0.1:1",
            schema_registry_ca_file=pki.ca,
            schema_registry_certfile=pki.client_cert,
            schema_registry_keyfile=pki.client_key,
            schema_registry_key_password=SecretStr(KEY_PASSWORD),
            schema_registry_username=USER,
            schema_registry_password=SecretStr(PASSWORD),
        )
    )
    assert auth.conf()["ssl.key.password"] == KEY_PASSWORD
    assert auth.conf()["ssl.certificate.location"] == str(pki.client_cert)
    assert KEY_PASSWORD not in repr(auth) and PASSWORD not in repr(auth)


def test_no_registry_needs_no_security(pki: Pki) -> None:
    codec = codec_from_settings(Settings())
    assert not isinstance(codec.resolver, SchemaRegistryResolver)


def test_every_process_builds_its_codec_from_the_settings() -> None:
    """A codec built from the URL alone would drop the TLS and basic auth settings."""
    root = Path(__file__).resolve().parents[2]
    offenders = [
        str(path.relative_to(root))
        for folder in ("streams", "connectors", "inference", "deploy")
        for path in (root / folder).rglob("*.py")
        if "codec_from_registry_url(" in path.read_text()
        or "SchemaRegistryResolver(" in path.read_text()
    ]
    assert offenders == ["streams/codecs.py"], offenders
