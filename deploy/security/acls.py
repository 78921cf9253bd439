"""Who may do what on a Sluice cluster: the ACL set, as plain values, and creating it.

Three principals (SCRAM users on the local secure broker, ``KafkaUser`` resources on
Strimzi, see ``deploy/k8s/kafka-users.yaml``):

* **workers** read every Sluice topic, write the topics they produce (results, the dead
  letters, training examples, metrics) and Faust's internal topics (``<app_id>-`` prefix),
  create missing topics, and use their consumer groups (``<app_id>``, ``<app_id>-*``).
  They may *read* ``llm.control`` and not write it, nor write ``llm.requests``.
* **producers** write ``llm.requests`` and ``llm.feedback``, read ``llm.results`` and the
  requests' dead letters (the client raises ``RequestRejected`` from them) and may use
  consumer groups named ``<app_id>.client.*`` for their result readers.
* **operators** are the only ones who write ``llm.control``; they read every Sluice topic
  (tail, replay, rollout status) and describe the workers' groups (lag).

Anything not granted is refused: the broker runs the KRaft ``StandardAuthorizer`` with
``allow.everyone.if.no.acl.found=false``. :func:`sluice_acls` is pure (tested with plain
values); :func:`create_acls` sends it to a broker with one CreateAcls request.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streams.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "AclBinding",
    "Operation",
    "PatternType",
    "Principals",
    "ResourceType",
    "SluiceResources",
    "create_acls",
    "sluice_acls",
]

CLUSTER_NAME = "kafka-cluster"


class ResourceType(enum.IntEnum):
    """Kafka's ``ResourceType`` codes (the wire values)."""

    TOPIC = 2
    GROUP = 3
    CLUSTER = 4
    TRANSACTIONAL_ID = 5


class PatternType(enum.IntEnum):
    LITERAL = 3
    PREFIXED = 4


class Operation(enum.IntEnum):
    """Kafka's ``AclOperation`` codes."""

    ALL = 2
    READ = 3
    WRITE = 4
    CREATE = 5
    DELETE = 6
    ALTER = 7
    DESCRIBE = 8
    CLUSTER_ACTION = 9
    DESCRIBE_CONFIGS = 10
    ALTER_CONFIGS = 11
    IDEMPOTENT_WRITE = 12


ALLOW = 3  # AclPermissionType.ALLOW


@dataclass(frozen=True, order=True)
class AclBinding:
    """One ALLOW rule: ``principal`` may ``operation`` on the resource, from any host."""

    principal: str  # "User:<name>"
    resource_type: ResourceType
    resource_name: str
    pattern_type: PatternType
    operation: Operation
    host: str = "*"

    def __str__(self) -> str:
        pattern = "prefix " if self.pattern_type is PatternType.PREFIXED else ""
        return (
            f"{self.principal} {self.operation.name} {self.resource_type.name} "
            f"{pattern}{self.resource_name!r}"
        )


@dataclass(frozen=True)
class Principals:
    """The SCRAM user names of the three roles."""

    workers: str = "sluice-worker"
    producers: str = "sluice-producer"
    operators: str = "sluice-operator"

    def as_dict(self) -> dict[str, str]:
        return {"worker": self.workers, "producer": self.producers, "operator": self.operators}


@dataclass(frozen=True)
class SluiceResources:
    """The topic and group names the ACLs talk about (defaults: the README's topics)."""

    requests: str = "llm.requests"
    results: str = "llm.results"
    dlq: str = "llm.requests.dlq"
    feedback: str = "llm.feedback"
    feedback_dlq: str = "llm.feedback.dlq"
    training: str = "llm.training-examples"
    metrics: str = "llm.metrics"
    control: str = "llm.control"
    app_id: str = "sluice"

    @classmethod
    def from_settings(cls, settings: Settings) -> SluiceResources:
        return cls(
            requests=settings.requests_topic,
            results=settings.results_topic,
            dlq=settings.dlq_topic,
            feedback=settings.feedback_topic,
            feedback_dlq=settings.feedback_dlq_topic,
            training=settings.training_topic,
            metrics=settings.metrics_topic,
            control=settings.control_topic,
            app_id=settings.app_id,
        )

    @property
    def topics(self) -> tuple[str, ...]:
        return (
            self.requests,
            self.results,
            self.dlq,
            self.feedback,
            self.feedback_dlq,
            self.training,
            self.metrics,
            self.control,
        )

    @property
    def internal_prefix(self) -> str:
        """Faust's internal topics and the workers' extra groups: ``<app_id>-``."""
        return f"{self.app_id}-"

    @property
    def client_group_prefix(self) -> str:
        """Consumer groups a producer's result readers may use: ``<app_id>.client.``."""
        return f"{self.app_id}.client."


def sluice_acls(
    resources: SluiceResources | None = None, principals: Principals | None = None
) -> list[AclBinding]:
    """The whole ACL set, sorted, without duplicates."""
    r = resources or SluiceResources()
    p = principals or Principals()
    out: set[AclBinding] = set()

    def grant(
        user: str,
        kind: ResourceType,
        names: Iterable[str],
        operations: Iterable[Operation],
        pattern: PatternType = PatternType.LITERAL,
    ) -> None:
        for name in names:
            for op in operations:
                out.add(AclBinding(f"User:{user}", kind, name, pattern, op))

    topic, group = ResourceType.TOPIC, ResourceType.GROUP
    read, write, describe = Operation.READ, Operation.WRITE, Operation.DESCRIBE

    # workers
    grant(
        p.workers,
        topic,
        r.topics,
        (read, describe, Operation.CREATE, Operation.DESCRIBE_CONFIGS),
    )
    grant(p.workers, topic, (r.results, r.dlq, r.feedback_dlq, r.training, r.metrics), (write,))
    grant(
        p.workers,
        topic,
        (r.internal_prefix,),
        (read, write, describe, Operation.CREATE, Operation.DESCRIBE_CONFIGS),
        PatternType.PREFIXED,
    )
    grant(p.workers, group, (r.app_id,), (read, describe))
    grant(p.workers, group, (r.internal_prefix,), (read, describe), PatternType.PREFIXED)

    # producers
    grant(p.producers, topic, (r.requests, r.feedback), (write, describe))
    grant(p.producers, topic, (r.results, r.dlq), (read, describe))
    grant(p.producers, group, (r.client_group_prefix,), (read, describe), PatternType.PREFIXED)

    # operators: the only writers of the control topic
    grant(p.operators, topic, (r.control,), (write,))
    grant(p.operators, topic, r.topics, (read, describe, Operation.DESCRIBE_CONFIGS))
    grant(p.operators, group, (r.app_id,), (describe,))
    grant(p.operators, group, (r.internal_prefix,), (describe,), PatternType.PREFIXED)
    return sorted(out)


def acls_by_principal(bindings: Iterable[AclBinding]) -> Mapping[str, list[AclBinding]]:
    """The bindings grouped by principal (for documentation and the Strimzi resources)."""
    grouped: dict[str, list[AclBinding]] = {}
    for binding in bindings:
        grouped.setdefault(binding.principal, []).append(binding)
    return grouped


# ---------------------------------------------------------------------- creating them


class AclCreationError(RuntimeError):
    """The broker refused to create some ACLs."""


async def create_acls(
    bootstrap: str,
    client_options: Mapping[str, Any],
    bindings: Sequence[AclBinding],
    *,
    timeout_s: float = 60.0,
) -> None:
    """Create ``bindings`` on the cluster at ``bootstrap`` (idempotent: existing ones are
    kept). ``client_options`` must authenticate a principal with ALTER on the cluster
    (a super user). Uses aiokafka's protocol layer: its admin client has no ACL calls."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, **client_options)
    try:
        async with asyncio.timeout(timeout_s):
            await client.bootstrap()
            node = client.get_random_node()
            response = await client.send(node, _create_acls_for(bindings))
        errors = [
            f"{binding}: error {code} {message or ''}".strip()
            for binding, (code, message) in zip(bindings, response.creation_responses, strict=True)
            if code != 0
        ]
        if errors:
            raise AclCreationError("the broker refused ACLs:\n" + "\n".join(errors))
        logger.info("created %d ACLs on %s", len(bindings), bootstrap)
    finally:
        await client.close()


def _create_acls_request() -> type:
    from aiokafka.protocol.admin import CreateAclsRequest

    class _Request(CreateAclsRequest):  # type: ignore[misc]
        """CreateAcls (v1: resource patterns) with many creations in one request."""

        def __init__(self, bindings: Sequence[AclBinding]) -> None:
            self._bindings = list(bindings)

        def build(self, request_struct_class: Any) -> Any:
            if request_struct_class.API_VERSION < 1:
                from aiokafka.errors import IncompatibleBrokerVersion

                raise IncompatibleBrokerVersion("CreateAcls v1 (resource patterns) needed")
            return request_struct_class(
                [
                    (
                        int(b.resource_type),
                        b.resource_name,
                        int(b.pattern_type),
                        b.principal,
                        b.host,
                        int(b.operation),
                        ALLOW,
                    )
                    for b in self._bindings
                ]
            )

    return _Request


def _create_acls_for(bindings: Sequence[AclBinding]) -> Any:
    return _create_acls_request()(bindings)


# ---------------------------------------------------------------------- Strimzi KafkaUser

_STRIMZI_OPERATION = {
    Operation.ALL: "All",
    Operation.READ: "Read",
    Operation.WRITE: "Write",
    Operation.CREATE: "Create",
    Operation.DELETE: "Delete",
    Operation.ALTER: "Alter",
    Operation.DESCRIBE: "Describe",
    Operation.CLUSTER_ACTION: "ClusterAction",
    Operation.DESCRIBE_CONFIGS: "DescribeConfigs",
    Operation.ALTER_CONFIGS: "AlterConfigs",
    Operation.IDEMPOTENT_WRITE: "IdempotentWrite",
}
_STRIMZI_RESOURCE = {
    ResourceType.TOPIC: "topic",
    ResourceType.GROUP: "group",
    ResourceType.CLUSTER: "cluster",
    ResourceType.TRANSACTIONAL_ID: "transactionalId",
}


def strimzi_users(
    bindings: Iterable[AclBinding],
    *,
    cluster: str = "my-cluster",
    namespace: str = "kafka",
) -> list[dict[str, Any]]:
    """``KafkaUser`` resources (kafka.strimzi.io/v1beta2, SCRAM-SHA-512, simple
    authorization) granting exactly ``bindings``: one resource per principal, one ACL rule
    per resource pattern with its operations."""
    users = []
    for principal, rules in sorted(acls_by_principal(bindings).items()):
        grouped: dict[tuple[ResourceType, str, PatternType], list[Operation]] = {}
        for rule in rules:
            key = (rule.resource_type, rule.resource_name, rule.pattern_type)
            grouped.setdefault(key, []).append(rule.operation)
        acls = []
        for (kind, name, pattern), operations in sorted(grouped.items()):
            resource: dict[str, Any] = {"type": _STRIMZI_RESOURCE[kind]}
            if kind is not ResourceType.CLUSTER:
                resource["name"] = name
                resource["patternType"] = "prefix" if pattern is PatternType.PREFIXED else "literal"
            acls.append(
                {
                    "resource": resource,
                    "operations": [_STRIMZI_OPERATION[op] for op in sorted(operations)],
                    "host": "*",
                }
            )
        users.append(
            {
                "apiVersion": "kafka.strimzi.io/v1beta2",
                "kind": "KafkaUser",
                "metadata": {
                    "name": principal.removeprefix("User:"),
                    "namespace": namespace,
                    "labels": {"strimzi.io/cluster": cluster},
                },
                "spec": {
                    "authentication": {"type": "scram-sha-512"},
                    "authorization": {"type": "simple", "acls": acls},
                },
            }
        )
    return users
