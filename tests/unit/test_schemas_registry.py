"""SchemaRegistryResolver: caching and error mapping, against a fake client and a stub registry.

The fake client has the real ``SchemaRegistryClient`` method signatures (checked below when
``confluent-kafka[schemaregistry]`` is installed). The stub-registry tests drive the real client
over HTTP against a few endpoints of the Schema Registry REST API; they are skipped when the
``schemaregistry`` extra is not installed.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from schemas import (
    AvroCodec,
    RegistryError,
    SchemaCatalog,
    SchemaError,
    SchemaRegistryResolver,
    UnknownSchemaError,
    WrongSchemaError,
    codec_from_registry_url,
)
from schemas.errors import RegistryUnavailableError
from schemas.resolver import SchemaResolver


class HttpError(Exception):
    """Shaped like ``SchemaRegistryError``: carries ``http_status_code``."""

    def __init__(self, http_status_code: int, message: str = "nope") -> None:
        super().__init__(message)
        self.http_status_code = http_status_code


class FakeClient:
    """An in-memory registry with the signatures of ``SchemaRegistryClient``'s methods."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.schemas: dict[int, Any] = {}
        self.subjects: dict[tuple[str, str], int] = {}
        self.fail: Exception | None = None

    def _id(self, schema_str: str) -> int:
        for schema_id, schema in self.schemas.items():
            if schema.schema_str == schema_str:
                return schema_id
        schema_id = 100 + len(self.schemas)
        self.schemas[schema_id] = SimpleNamespace(
            schema_str=schema_str, schema_type="AVRO", references=[]
        )
        return schema_id

    def register_schema(
        self, subject_name: str, schema: Any, normalize_schemas: bool = False
    ) -> int:
        self.calls.append(("register", subject_name))
        if self.fail:
            raise self.fail
        schema_id = self._id(schema.schema_str)
        self.subjects[(subject_name, schema.schema_str)] = schema_id
        return schema_id

    def lookup_schema(
        self,
        subject_name: str,
        schema: Any,
        normalize_schemas: bool = False,
        fmt: str | None = None,
        deleted: bool = False,
    ) -> Any:
        self.calls.append(("lookup", subject_name))
        if self.fail:
            raise self.fail
        schema_id = self.subjects.get((subject_name, schema.schema_str))
        if schema_id is None:
            raise HttpError(404, "Schema not found")
        return SimpleNamespace(schema_id=schema_id, subject=subject_name, version=1)

    def get_schema(
        self,
        schema_id: int,
        subject_name: str | None = None,
        fmt: str | None = None,
        reference_format: str | None = None,
    ) -> Any:
        self.calls.append(("get", schema_id))
        if self.fail:
            raise self.fail
        if schema_id not in self.schemas:
            raise HttpError(404, "Schema 7 not found")
        return self.schemas[schema_id]


class FakeResolver(SchemaRegistryResolver):
    """Builds plain objects instead of ``confluent_kafka`` ``Schema``s, which may be missing."""

    @staticmethod
    def _make_schema(schema_str: str) -> Any:
        return SimpleNamespace(schema_str=schema_str, schema_type="AVRO", references=[])


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


def test_fake_client_matches_the_real_signatures() -> None:
    registry = pytest.importorskip("confluent_kafka.schema_registry")
    for method in ("register_schema", "lookup_schema", "get_schema"):
        real = inspect.signature(getattr(registry.SchemaRegistryClient, method))
        fake = inspect.signature(getattr(FakeClient, method))
        assert list(real.parameters) == list(fake.parameters), method


def test_registers_under_the_full_record_name_once(client: FakeClient) -> None:
    resolver = FakeResolver(client=client)
    assert isinstance(resolver, SchemaResolver)
    first = resolver.id_for("InferenceRequest")
    assert resolver.id_for("dev.sluice.InferenceRequest") == first
    assert resolver.subject_for("InferenceRequest") == "dev.sluice.InferenceRequest"
    assert client.calls == [("register", "dev.sluice.InferenceRequest")]
    registered = json.loads(client.schemas[first].schema_str)
    assert registered == SchemaCatalog.default().raw("InferenceRequest")


def test_codec_over_registry_frames_registry_ids_and_reads_its_own_without_fetching(
    client: FakeClient,
) -> None:
    codec = AvroCodec(FakeResolver(client=client))
    encoded = codec.encode("FeedbackEvent", {"request_id": "r", "score": 1})
    assert int.from_bytes(encoded[1:5], "big") == 100
    assert codec.decode(encoded) == codec.decode(encoded)
    assert codec.decode_as(encoded, "FeedbackEvent")["score"] == 1
    assert [call for call in client.calls if call[0] == "get"] == []


def test_fetches_unknown_ids_once_and_resolves_other_versions(client: FakeClient) -> None:
    producer = AvroCodec(FakeResolver(client=client))
    v2 = copy.deepcopy(SchemaCatalog.default().raw("FeedbackEvent"))
    v2["fields"].append({"name": "weight", "type": "double", "default": 1.0})
    v2_catalog = SchemaCatalog([v2])
    newer = AvroCodec(FakeResolver(client=client, catalog=v2_catalog))

    encoded = newer.encode("FeedbackEvent", {"request_id": "r", "score": -1, "weight": 3.5})
    consumer = AvroCodec(FakeResolver(client=client))  # fresh caches, current = v1
    for _ in range(3):
        name, record = consumer.decode(encoded, expected="FeedbackEvent")
        assert name == "FeedbackEvent"
        assert record["score"] == -1 and "weight" not in record
    schema_id = int.from_bytes(encoded[1:5], "big")
    assert client.calls.count(("get", schema_id)) == 1
    assert producer.decode_as(encoded, "FeedbackEvent") == record


def test_auto_register_off_only_looks_up(client: FakeClient) -> None:
    FakeResolver(client=client).id_for("DeadLetter")
    client.calls.clear()
    resolver = FakeResolver(client=client, auto_register=False)
    assert resolver.id_for("DeadLetter") == 100
    assert client.calls == [("lookup", "dev.sluice.DeadLetter")]
    with pytest.raises(RegistryError, match="looking up dev.sluice.InferenceResult") as caught:
        resolver.id_for("InferenceResult")
    assert caught.value.retriable is False


@pytest.mark.parametrize(
    ("failure", "retriable"),
    [
        (HttpError(500), True),
        (HttpError(503), True),
        (HttpError(429), True),
        (HttpError(409, "incompatible"), False),
        (HttpError(422, "invalid schema"), False),
        (HttpError(401, "unauthorized"), False),
        (ConnectionError("refused"), True),
        (TimeoutError("slow"), True),
    ],
)
def test_client_failures_become_registry_errors(
    client: FakeClient, failure: Exception, retriable: bool
) -> None:
    resolver = FakeResolver(client=client)
    client.fail = failure
    for call in (lambda: resolver.id_for("InferenceRequest"), lambda: resolver.schema_for_id(5)):
        with pytest.raises(RegistryError, match="schema registry failed") as caught:
            call()
        assert caught.value.retriable is retriable
        assert isinstance(caught.value, RegistryUnavailableError) is retriable
        assert caught.value.reason_code == (
            "registry_unavailable" if retriable else "registry_error"
        )
        assert not isinstance(caught.value, SchemaError)  # never a dead letter
        assert caught.value.__cause__ is failure
    client.fail = None
    assert resolver.id_for("InferenceRequest") == 100  # a failure is not cached


def test_unknown_id_is_unknown_schema_not_a_registry_failure(client: FakeClient) -> None:
    codec = AvroCodec(FakeResolver(client=client))
    with pytest.raises(UnknownSchemaError, match="7"):
        codec.decode(b"\x00\x00\x00\x00\x07\x00")


@pytest.mark.parametrize(
    ("schema", "error", "message"),
    [
        (
            SimpleNamespace(schema_str="{}", schema_type="JSON", references=[]),
            WrongSchemaError,
            "JSON",
        ),
        (
            SimpleNamespace(schema_str='"string"', schema_type="AVRO", references=[]),
            WrongSchemaError,
            "record",
        ),
        (
            SimpleNamespace(schema_str="{nope", schema_type="AVRO", references=[]),
            SchemaError,
            "valid",
        ),
        (
            SimpleNamespace(schema_str="{}", schema_type="AVRO", references=[{"name": "x"}]),
            SchemaError,
            "references",
        ),
    ],
)
def test_schemas_we_cannot_use(
    client: FakeClient, schema: Any, error: type[Exception], message: str
) -> None:
    client.schemas[42] = schema
    with pytest.raises(error, match=message):
        FakeResolver(client=client).schema_for_id(42)


def test_needs_a_url_or_a_client() -> None:
    with pytest.raises(ValueError, match="url or a client"):
        SchemaRegistryResolver()


# -- the real client against a stub registry -----------------------------------------------------


class StubRegistry(BaseHTTPRequestHandler):
    """Just enough of the Schema Registry REST API: register, look up, get by id."""

    schemas: dict[int, str]
    subjects: dict[tuple[str, str], int]

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return None

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = self.path.split("?")[0]
        if match := re.fullmatch(r"/subjects/([^/]+)/versions", path):
            schema_id = next(
                (i for i, s in self.schemas.items() if s == body["schema"]), 1 + len(self.schemas)
            )
            self.schemas[schema_id] = body["schema"]
            self.subjects[(match[1], body["schema"])] = schema_id
            self._reply(200, {"id": schema_id})
        elif match := re.fullmatch(r"/subjects/([^/]+)", path):
            schema_id = self.subjects.get((match[1], body["schema"]))
            if schema_id is None:
                self._reply(404, {"error_code": 40403, "message": "Schema not found"})
            else:
                self._reply(
                    200,
                    {"subject": match[1], "id": schema_id, "version": 1, "schema": body["schema"]},
                )
        else:
            self._reply(404, {"error_code": 404, "message": "no such endpoint"})

    def do_GET(self) -> None:
        match = re.fullmatch(r"/schemas/ids/(\d+)", self.path.split("?")[0])
        if match and int(match[1]) in self.schemas:
            self._reply(200, {"schema": self.schemas[int(match[1])]})
        else:
            self._reply(404, {"error_code": 40403, "message": "Schema not found"})


@pytest.fixture
def registry_url() -> Iterator[str]:
    pytest.importorskip("confluent_kafka.schema_registry")
    handler = type("Handler", (StubRegistry,), {"schemas": {}, "subjects": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_real_client_round_trip_through_a_stub_registry(registry_url: str) -> None:
    producer = codec_from_registry_url(registry_url)
    assert isinstance(producer.resolver, SchemaRegistryResolver)
    record = {"request_id": "r", "prompt": "hi", "created_at": 1_700_000_000_000}
    encoded = producer.encode("InferenceRequest", record)
    assert encoded[:5] == b"\x00\x00\x00\x00\x01"

    consumer = codec_from_registry_url(registry_url)  # fresh caches: fetches id 1 over HTTP
    assert consumer.decode_as(encoded, "InferenceRequest")["created_at"] == record["created_at"]
    with pytest.raises(UnknownSchemaError):
        consumer.decode(b"\x00\x00\x00\x00\x63" + encoded[5:])

    lookup_only = SchemaRegistryResolver(registry_url, auto_register=False)
    assert lookup_only.id_for("InferenceRequest") == 1
    with pytest.raises(RegistryError) as caught:
        lookup_only.id_for("FeedbackEvent")
    assert caught.value.retriable is False


def test_real_client_unreachable_registry_is_retriable() -> None:
    pytest.importorskip("confluent_kafka.schema_registry")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    resolver = SchemaRegistryResolver(
        f"http://127.0.0.1:{port}", client_conf={"max.retries": 0, "timeout": 2}
    )
    with pytest.raises(RegistryError) as caught:
        resolver.id_for("InferenceRequest")
    assert caught.value.retriable is True


def test_real_client_rejects_bad_settings() -> None:
    pytest.importorskip("confluent_kafka.schema_registry")
    with pytest.raises(RegistryError, match="invalid schema registry settings") as caught:
        SchemaRegistryResolver("http://127.0.0.1:1", client_conf={"no.such.setting": 1})
    assert caught.value.retriable is False


def test_missing_schemaregistry_extra_is_a_clear_permanent_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka.schema_registry", None)  # import fails
    with pytest.raises(RegistryError, match=r"confluent-kafka\[schemaregistry\]") as caught:
        codec_from_registry_url("http://registry:8081")
    assert caught.value.retriable is False


# -- outages, negative caching and the event loop, against a registry we can stop ---------------


class Registry:
    """A stub Schema Registry on 127.0.0.1 that can be stopped and started on the same port
    (an outage), keeps its schemas across restarts and counts the requests it served."""

    def __init__(self, get_delay_s: float = 0.0) -> None:
        self.schemas: dict[int, str] = {}
        self.subjects: dict[tuple[str, str], int] = {}
        self.gets: list[int] = []
        self.get_delay_s = get_delay_s
        self.port = 0
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        import time

        outer = self

        class Handler(StubRegistry):
            schemas = outer.schemas
            subjects = outer.subjects

            def do_GET(self) -> None:
                match = re.fullmatch(r"/schemas/ids/(\d+)", self.path.split("?")[0])
                if match is None:  # not an endpoint of a registry: a proxy's plain 404
                    data = b"<html>not found</html>"
                    self.send_response(404)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                outer.gets.append(int(match[1]))
                time.sleep(outer.get_delay_s)
                super().do_GET()

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def registry() -> Iterator[Registry]:
    pytest.importorskip("confluent_kafka.schema_registry")
    reg = Registry()
    reg.start()
    try:
        yield reg
    finally:
        if reg._server is not None:
            reg.stop()


FAST = {"max.retries": 0, "timeout": 2}


def resolver_for(registry: Registry, **kwargs: Any) -> SchemaRegistryResolver:
    return SchemaRegistryResolver(registry.url, client_conf=FAST, **kwargs)


def a_request(codec: AvroCodec, rid: str = "r") -> bytes:
    return codec.encode(
        "InferenceRequest", {"request_id": rid, "prompt": "hi", "created_at": 1_700_000_000_000}
    )


def test_outage_is_retriable_and_heals_without_losing_the_record(registry: Registry) -> None:
    encoded = a_request(AvroCodec(resolver_for(registry)))
    consumer = AvroCodec(resolver_for(registry))  # fresh caches: must ask the registry
    registry.stop()  # the outage
    for _ in range(2):  # failures are not cached: each try asks again
        with pytest.raises(RegistryUnavailableError) as caught:
            consumer.decode(encoded, expected="InferenceRequest")
        error = caught.value
        assert error.retriable is True
        assert error.reason_code == "registry_unavailable"
        assert not isinstance(error, SchemaError)  # code that dead-letters SchemaError skips it
    registry.start()  # same port, same schemas
    assert consumer.decode_as(encoded, "InferenceRequest")["request_id"] == "r"


def test_outage_while_registering_is_retriable(registry: Registry) -> None:
    resolver = resolver_for(registry)
    registry.stop()
    with pytest.raises(RegistryUnavailableError):
        resolver.id_for("InferenceResult")
    registry.start()
    assert resolver.id_for("InferenceResult") == 1


def test_unknown_id_is_permanent_and_cached_with_a_ttl(registry: Registry) -> None:
    encoded = a_request(AvroCodec(resolver_for(registry)))
    bogus = b"\x00\x00\x00\x00\x63" + encoded[5:]  # id 99: not in the registry
    now = [1_000.0]
    consumer = AvroCodec(resolver_for(registry, negative_ttl_s=30.0, clock=lambda: now[0]))
    for _ in range(5):
        with pytest.raises(UnknownSchemaError) as caught:
            consumer.decode(bogus)
        assert caught.value.retriable is False
        assert caught.value.reason_code == "unknown_schema"
    assert registry.gets == [99]  # asked once: the negative answer is cached
    now[0] += 29.0
    with pytest.raises(UnknownSchemaError):
        consumer.decode(bogus)
    assert registry.gets == [99]
    # After the TTL the registry is asked again; the id exists by now.
    registry.schemas[99] = registry.schemas[1]
    now[0] += 2.0
    assert consumer.decode_as(bogus, "InferenceRequest")["request_id"] == "r"
    assert registry.gets == [99, 99]


def test_negative_cache_is_bounded(registry: Registry) -> None:
    resolver = resolver_for(registry, max_negative=3)
    for schema_id in range(50, 56):
        with pytest.raises(UnknownSchemaError):
            resolver.schema_for_id(schema_id)
    assert len(resolver._unknown) == 3
    with pytest.raises(UnknownSchemaError):
        resolver.schema_for_id(50)  # evicted: asked again
    assert registry.gets.count(50) == 2


def test_a_404_that_is_not_the_registrys_is_not_a_dead_letter(registry: Registry) -> None:
    wrong = SchemaRegistryResolver(registry.url + "/wrong-prefix", client_conf=FAST)
    with pytest.raises(RegistryError, match="is the URL right") as caught:
        wrong.schema_for_id(1)
    assert not isinstance(caught.value, SchemaError)
    assert caught.value.retriable is False
    assert caught.value.reason_code == "registry_error"


def test_ids_are_cached_both_ways(registry: Registry) -> None:
    producer = resolver_for(registry)
    schema_id = producer.id_for("FeedbackEvent")
    assert producer.cached_schema(schema_id) is not None  # name -> id gave id -> schema
    assert producer.schema_for_id(schema_id)[0] == "dev.sluice.FeedbackEvent"
    assert registry.gets == []
    # A reader that first sees the id learns the name -> id direction from it.
    reader = resolver_for(registry, auto_register=False)
    reader.schema_for_id(schema_id)
    assert reader.cached_id("FeedbackEvent") == schema_id
    registry.stop()  # no registry needed any more for this record, either way
    assert reader.id_for("FeedbackEvent") == schema_id
    assert reader.schema_for_id(schema_id)[0] == "dev.sluice.FeedbackEvent"


async def test_adecode_never_blocks_the_event_loop(registry: Registry) -> None:
    import asyncio
    import time

    from schemas.registry import adecode

    encoded = a_request(AvroCodec(resolver_for(registry)))
    registry.get_delay_s = 0.5  # a slow registry
    consumer = AvroCodec(resolver_for(registry))
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(*(adecode(consumer, encoded) for _ in range(20)))
    finally:
        tick.cancel()
    assert all(name == "InferenceRequest" for name, _ in results)
    assert registry.gets == [1]  # twenty records waiting for one id: one fetch
    assert len(gaps) >= 20 and max(gaps) < 0.25  # the loop kept running during the 0.5 s


async def test_adecode_outage_and_unknown_id(registry: Registry) -> None:
    from schemas.registry import adecode, awarm_up

    producer = AvroCodec(resolver_for(registry))
    await awarm_up(producer, ("InferenceRequest", "DeadLetter"))
    registry.stop()
    encoded = a_request(producer)  # no registry call: warmed up
    assert (await adecode(producer, encoded))[0] == "InferenceRequest"
    consumer = AvroCodec(resolver_for(registry))
    with pytest.raises(RegistryUnavailableError):
        await adecode(consumer, encoded)
    registry.start()
    with pytest.raises(UnknownSchemaError):
        await adecode(consumer, b"\x00\x00\x00\x00\x63" + encoded[5:])
    with pytest.raises(SchemaError, match="not Confluent-framed"):
        await adecode(consumer, b"junk")  # not framed: the codec says why, no registry call
    assert (await adecode(consumer, encoded))[1]["request_id"] == "r"


async def test_a_blocking_call_on_the_loop_is_logged(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    encoded = a_request(AvroCodec(resolver_for(registry)))
    consumer = AvroCodec(resolver_for(registry))
    with caplog.at_level("WARNING", logger="schemas.registry"):
        consumer.decode(encoded)
    assert "blocking HTTP call for schema id 1 on the event loop" in caplog.text


async def test_adecode_over_the_catalog_is_plain_decode() -> None:
    from schemas.registry import adecode

    codec = AvroCodec.default()
    encoded = a_request(codec)
    assert (await adecode(codec, encoded)) == codec.decode(encoded)
