"""Client security from settings (streams/security.py), the ACL set and its Strimzi form
(deploy/security/acls.py), and the secure local broker's configuration, without a broker."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import stat
from pathlib import Path

import faust
import pytest
import yaml
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr

from deploy.local_kafka import LocalKafka
from deploy.security.acls import (
    AclBinding,
    Operation,
    PatternType,
    Principals,
    ResourceType,
    SluiceResources,
    sluice_acls,
    strimzi_users,
)
from deploy.security.certs import CertificateAuthority
from streams.security import (
    SASL_MECHANISMS,
    KafkaSecurity,
    KafkaSecurityError,
    faust_credentials,
    registry_auth,
)
from streams.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-pa55word-never-shown"
KEY_PASSWORD = "key-pa55word-never-shown"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate with an encrypted key."""
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create()
    server = ca.issue("server", hosts=("127.0.0.1", "localhost"))
    client = ca.issue("client", server=False, client=True, key_password=KEY_PASSWORD)
    other_ca = CertificateAuthority.create("someone else")
    files = {
        "ca": (root / "ca.pem", ca.cert_pem),
        "other_ca": (root / "other-ca.pem", other_ca.cert_pem),
        "server_cert": (root / "server.pem", server.cert_pem),
        "server_key": (root / "server.key", server.key_pem),
        "client_cert": (root / "client.pem", client.cert_pem),
        "client_key": (root / "client.key", client.key_pem),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {name: path for name, (path, _) in files.items()}


def _settings(**fields: object) -> Settings:
    return Settings(**fields)  # type: ignore[arg-type]


def _sasl(protocol: str, mechanism: str, **more: object) -> Settings:
    return _settings(
        kafka_security_protocol=protocol,
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="alice",
        kafka_sasl_password=PASSWORD,
        **more,
    )


# ---------------------------------------------------------------------- options per protocol


def test_plaintext_has_no_tls_and_no_credentials() -> None:
    settings = _settings()
    assert settings.kafka_client_options() == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(settings) is None


def test_ssl_verifies_the_broker_with_the_ca_file(pki: dict[str, Path]) -> None:
    settings = _settings(kafka_security_protocol="SSL", kafka_ssl_cafile=pki["ca"])
    opts = settings.kafka_client_options()
    assert opts["security_protocol"] == "SSL"
    context = opts["ssl_context"]
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert "sasl_mechanism" not in opts
    # Faust: SSL alone must still be TLS (it used to be no credentials at all: plain text)
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SSLCredentials)
    auth = credentials_to_aiokafka_auth(credentials)
    assert auth["security_protocol"] == "SSL"
    assert auth["ssl_context"].verify_mode is ssl.CERT_REQUIRED


def test_ssl_without_a_ca_file_uses_the_system_cas() -> None:
    opts = _settings(kafka_security_protocol="SSL").kafka_client_options()
    assert opts["ssl_context"].verify_mode is ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("protocol", "mechanism"),
    list(itertools.product(("SASL_PLAINTEXT", "SASL_SSL"), SASL_MECHANISMS)),
)
def test_every_sasl_protocol_and_mechanism(
    protocol: str, mechanism: str, pki: dict[str, Path]
) -> None:
    tls = protocol == "SASL_SSL"
    settings = _sasl(protocol, mechanism, **({"kafka_ssl_cafile": pki["ca"]} if tls else {}))
    opts = settings.kafka_client_options()
    assert opts["security_protocol"] == protocol
    assert opts["sasl_mechanism"] == mechanism
    assert opts["sasl_plain_username"] == "alice"
    assert opts["sasl_plain_password"] == PASSWORD
    assert ("ssl_context" in opts) is tls
    # Faust gets the same: SASL_SSL stays TLS (it used to become SASL over plain text)
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    auth = credentials_to_aiokafka_auth(credentials)
    assert auth["security_protocol"] == protocol
    assert auth["sasl_mechanism"] == mechanism
    assert auth["sasl_plain_password"] == PASSWORD
    assert (auth["ssl_context"] is not None) is tls


def test_mutual_tls_loads_the_client_certificate(pki: dict[str, Path]) -> None:
    settings = _settings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki["ca"],
        kafka_ssl_certfile=pki["client_cert"],
        kafka_ssl_keyfile=pki["client_key"],
        kafka_ssl_key_password=KEY_PASSWORD,
    )
    assert isinstance(settings.kafka_client_options()["ssl_context"], ssl.SSLContext)


def test_wrong_key_password_is_a_clear_error_without_the_password(pki: dict[str, Path]) -> None:
    settings = _settings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki["ca"],
        kafka_ssl_certfile=pki["client_cert"],
        kafka_ssl_keyfile=pki["client_key"],
        kafka_ssl_key_password="not-" + KEY_PASSWORD,
    )
    with pytest.raises(KafkaSecurityError, match="client certificate") as info:
        settings.kafka_client_options()
    assert KEY_PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "kafka_sasl_mechanism"),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-512"},
            "kafka_sasl_username and kafka_sasl_password",
        ),
        (
            {
                "kafka_security_protocol": "SASL_PLAINTEXT",
                "kafka_sasl_mechanism": "GSSAPI",
                "kafka_sasl_username": "a",
                "kafka_sasl_password": "b",
            },
            "kafka_sasl_mechanism",
        ),
        ({"kafka_ssl_cafile": "/etc/ca.pem"}, "plain text"),
        ({"kafka_sasl_username": "a", "kafka_sasl_password": "b"}, "does not authenticate"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/k.pem"}, "certfile"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nowhere/ca.pem"}, "CA file"),
    ],
)
def test_incomplete_or_contradictory_settings_are_refused(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(KafkaSecurityError, match=message):
        _settings(**fields).kafka_client_options()


def test_secrets_never_in_reprs(pki: dict[str, Path]) -> None:
    settings = _sasl(
        "SASL_SSL",
        "SCRAM-SHA-512",
        kafka_ssl_cafile=pki["ca"],
        kafka_ssl_certfile=pki["client_cert"],
        kafka_ssl_keyfile=pki["client_key"],
        kafka_ssl_key_password=KEY_PASSWORD,
        schema_registry_url="https://registry.example",
        schema_registry_username="reg",
        schema_registry_password=PASSWORD,
        schema_registry_ca_file=pki["ca"],
    )
    security = KafkaSecurity(
        protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="alice",
        sasl_password=SecretStr(PASSWORD),
        key_password=SecretStr(KEY_PASSWORD),
    )
    texts = [
        repr(settings),
        str(settings),
        repr(security),
        repr(faust_credentials(settings)),
        repr(registry_auth(settings)),
    ]
    for text in texts:
        assert PASSWORD not in text
        assert KEY_PASSWORD not in text


def test_registry_auth_from_settings(pki: dict[str, Path]) -> None:
    auth = registry_auth(
        _settings(
            schema_registry_url="https://registry.example",
            schema_registry_username="reg",
            schema_registry_password=PASSWORD,
            schema_registry_ca_file=pki["ca"],
        )
    )
    assert isinstance(auth.verify, ssl.SSLContext)
    assert auth.basic_auth is not None and auth.basic_auth[0] == "reg"
    assert auth.conf() == {
        "ssl.ca.location": str(pki["ca"]),
        "basic.auth.user.info": f"reg:{PASSWORD}",
    }
    assert registry_auth(_settings()).conf() == {}
    with pytest.raises(KafkaSecurityError, match="go together"):
        registry_auth(_settings(schema_registry_username="reg"))


# ---------------------------------------------------------------------- real TLS handshakes


async def _handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> str:
    """Open a TLS connection to a local server; return the client certificate's CN it saw."""
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        seen.extend(v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_context), 10
        )
        await asyncio.sleep(0.05)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    return seen[0] if seen else ""


def _server_context(pki: dict[str, Path], *, want_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki["server_cert"]), str(pki["server_key"]))
    context.verify_mode = ssl.CERT_REQUIRED if want_client_cert else ssl.CERT_NONE
    return context


async def test_context_trusts_the_ca_file_and_presents_the_client_cert(
    pki: dict[str, Path],
) -> None:
    client = _settings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki["ca"],
        kafka_ssl_certfile=pki["client_cert"],
        kafka_ssl_keyfile=pki["client_key"],
        kafka_ssl_key_password=KEY_PASSWORD,
    ).kafka_client_options()["ssl_context"]
    assert await _handshake(_server_context(pki, want_client_cert=True), client) == "client"


async def test_context_refuses_a_server_from_another_ca(pki: dict[str, Path]) -> None:
    client = _settings(
        kafka_security_protocol="SSL", kafka_ssl_cafile=pki["other_ca"]
    ).kafka_client_options()["ssl_context"]
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(_server_context(pki, want_client_cert=False), client)


# ---------------------------------------------------------------------- the ACL set


def _allowed(bindings: list[AclBinding], user: str, op: Operation, topic: str) -> bool:
    for b in bindings:
        if b.principal != f"User:{user}" or b.resource_type is not ResourceType.TOPIC:
            continue
        matches = (
            topic.startswith(b.resource_name)
            if b.pattern_type is PatternType.PREFIXED
            else topic == b.resource_name
        )
        if matches and b.operation in (op, Operation.ALL):
            return True
    return False


def test_only_operators_write_the_control_topic() -> None:
    acls, p, r = sluice_acls(), Principals(), SluiceResources()
    writers = {
        user
        for user in (p.workers, p.producers, p.operators)
        if _allowed(acls, user, Operation.WRITE, r.control)
    }
    assert writers == {p.operators}
    assert _allowed(acls, p.workers, Operation.READ, r.control)


def test_producers_write_requests_and_feedback_and_read_results_only() -> None:
    acls, p, r = sluice_acls(), Principals(), SluiceResources()
    written = {t for t in r.topics if _allowed(acls, p.producers, Operation.WRITE, t)}
    read = {t for t in r.topics if _allowed(acls, p.producers, Operation.READ, t)}
    assert written == {r.requests, r.feedback}
    assert read == {r.results, r.dlq}
    assert not _allowed(acls, p.producers, Operation.READ, "sluice-intake-changelog")


def test_workers_write_their_outputs_and_faust_internals_not_requests() -> None:
    acls, p, r = sluice_acls(), Principals(), SluiceResources()
    written = {t for t in r.topics if _allowed(acls, p.workers, Operation.WRITE, t)}
    assert written == {r.results, r.dlq, r.feedback_dlq, r.training, r.metrics}
    assert all(_allowed(acls, p.workers, Operation.READ, t) for t in r.topics)
    for internal in ("sluice-__assignor-__leader", "sluice-metrics-windows-state"):
        assert _allowed(acls, p.workers, Operation.WRITE, internal)
        assert _allowed(acls, p.workers, Operation.CREATE, internal)


def test_acls_follow_the_settings_names() -> None:
    settings = _settings(app_id="tenant-a", control_topic="a.control")
    acls = sluice_acls(SluiceResources.from_settings(settings))
    assert _allowed(acls, "sluice-operator", Operation.WRITE, "a.control")
    assert not _allowed(acls, "sluice-operator", Operation.WRITE, "llm.control")
    assert _allowed(acls, "sluice-worker", Operation.WRITE, "tenant-a-join-changelog")
    assert not _allowed(acls, "sluice-worker", Operation.WRITE, "sluice-join-changelog")


def test_kafka_users_manifest_matches_the_acl_set() -> None:
    shipped = list(yaml.safe_load_all((REPO / "deploy/k8s/kafka-users.yaml").read_text()))
    assert shipped == strimzi_users(sluice_acls())
    names = [doc["metadata"]["name"] for doc in shipped]
    assert sorted(names) == sorted(Principals().as_dict().values())


# ---------------------------------------------------------------------- secure broker config


def test_secure_broker_config_has_only_a_sasl_ssl_client_listener(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, secure=True)
    kafka.state_dir.mkdir(parents=True)
    kafka._ensure_security(None)
    kafka._write_properties(19092, 19093)
    props = dict(
        line.split("=", 1)
        for line in kafka.properties_file.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert props["listeners"] == "SASL_SSL://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "SASL_SSL://127.0.0.1:19092"
    assert props["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:SSL"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["super.users"] == "User:sluice-admin;User:CN=sluice-broker"
    # files holding secrets are the owner's only; the CA certificate is public
    for path in (kafka.properties_file, kafka.keystore_file, kafka.credentials_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    passwords = kafka._credentials()
    assert set(passwords) == {"sluice-admin", *Principals().as_dict().values()}
    assert len(set(passwords.values())) == 4
    # the broker's certificate is valid for 127.0.0.1 under the generated CA
    context = ssl.create_default_context(cafile=str(kafka.ca_file))
    assert context.cert_store_stats()["x509_ca"] == 1


def test_plain_broker_config_is_unchanged(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path)
    kafka.state_dir.mkdir(parents=True)
    kafka._write_properties(19092, 19093)
    text = kafka.properties_file.read_text()
    assert "listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093\n" in text
    assert "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n" in text
    assert "SASL" not in text and "authorizer" not in text
    assert kafka.state_dir.name == "broker"


def test_env_files_give_each_role_its_settings(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, secure=True)
    kafka.state_dir.mkdir(parents=True)
    kafka._ensure_security(None)
    kafka._write_env_files("127.0.0.1:19092")
    for role, user in Principals().as_dict().items():
        path = kafka.env_file(role)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        settings = Settings(_env_file=path)  # type: ignore[call-arg]
        assert settings.kafka_sasl_username == user
        assert settings.kafka_bootstrap == "127.0.0.1:19092"
        opts = settings.kafka_client_options()
        assert opts["security_protocol"] == "SASL_SSL"
        assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
        assert opts["sasl_plain_password"] == kafka._credentials()[user]
    assert kafka.env_file("worker").name == "secure.env"
