"""Reads what ``sluice top`` shows from the broker: the worker roles' consumer groups and
their members, each group's committed offsets against the end offsets (lag), the latest
``MetricsWindow`` records on ``llm.metrics`` and the fold of ``llm.control``.

Never joins a group (group-less consumers and the admin client only). A part that cannot
be read (a topic that does not exist yet, a group that is gone) becomes a line in
``Snapshot.errors``; the rest is still shown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError

from connectors.top.snapshot import Group, Member, PartitionLag, Snapshot, latest_windows
from schemas.codec import AvroCodec
from schemas.errors import RegistryError, SchemaError, SluiceError
from schemas.registry import adecode
from streams.kafka_clients import stop_consumer, topic_partitions
from streams.rollout import fold
from streams.settings import Settings

logger = logging.getLogger(__name__)


class TopError(SluiceError):
    """The broker could not be read for a snapshot."""


def role_groups(settings: Settings) -> list[tuple[str, str]]:
    """(role, consumer group) of every worker role (``streams.app``)."""
    return [
        ("inference", settings.app_id),
        ("join", f"{settings.app_id}-join"),
        ("metrics", f"{settings.app_id}-metrics"),
    ]


def decode_assignment(data: bytes | None) -> tuple[tuple[str, int], ...]:
    """The partitions in a member's assignment (the consumer protocol's encoding)."""
    if not data:
        return ()
    try:
        assignment = ConsumerProtocolMemberAssignment.decode(data)
    except Exception:  # another protocol's bytes: show no partitions rather than fail
        return ()
    return tuple(sorted((tp.topic, tp.partition) for tp in assignment.partitions()))


def parse_members(raw: Iterable[tuple[Any, ...]]) -> tuple[Member, ...]:
    """Members of a DescribeGroups response: (member_id, [group_instance_id,] client_id,
    client_host, metadata, assignment), the instance id only from version 4."""
    members = []
    for entry in raw:
        fields = list(entry)
        if len(fields) >= 6:
            fields = [fields[0], *fields[2:]]
        member_id, client_id, host, _, assignment = fields[:5]
        members.append(
            Member(
                str(client_id),
                str(host).lstrip("/"),
                decode_assignment(assignment),
                str(member_id),
            )
        )
    return tuple(sorted(members, key=lambda m: m.client_id))


async def take_snapshot(
    settings: Settings,
    bootstrap: str,
    codec: AvroCodec,
    *,
    window_records: int = 500,
) -> Snapshot:
    """One snapshot; reads at most ``window_records`` recent records per metrics partition."""
    errors: list[str] = []
    options = settings.kafka_client_options()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **options)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **options,
    )
    try:
        await admin.start()
        await consumer.start()
        groups = await _groups(admin, settings, errors)
        partitions = await _lag(admin, consumer, settings, groups, errors)
        windows = await _recent(consumer, settings.metrics_topic, window_records, codec)
        commands = await _recent(consumer, settings.control_topic, None, codec)
    except KafkaError as exc:
        raise TopError(f"cannot read the broker at {bootstrap}: {exc}") from exc
    finally:
        await stop_consumer(consumer)
        await admin.close()
    if windows is None:
        errors.append(f"{settings.metrics_topic} does not exist yet: is a metrics worker running?")
    if commands is None:
        errors.append(f"{settings.control_topic} does not exist yet: the base model serves")
    control = [c for c in commands or () if c.get("_schema") == "ControlCommand"]
    decisions = [c for c in control if c.get("evidence")]
    return Snapshot(
        taken_at_ms=int(time.time() * 1000),
        bootstrap=bootstrap,
        groups=groups,
        partitions=partitions,
        windows=latest_windows(w for w in windows or () if w.get("_schema") == "MetricsWindow"),
        rollout=fold(control) if commands is not None else None,
        control_commands=len(control),
        last_decision=decisions[-1] if decisions else None,
        errors=tuple(errors),
    )


async def _groups(
    admin: AIOKafkaAdminClient, settings: Settings, errors: list[str]
) -> tuple[Group, ...]:
    found = []
    for role, group_id in role_groups(settings):
        try:
            responses = await admin.describe_consumer_groups([group_id])
        except Exception as exc:
            errors.append(f"group {group_id}: {exc}")
            continue
        for response in responses:
            for info in response.groups:
                # (error_code, group_id, state, protocol_type, protocol, members, ...)
                if info[1] != group_id or info[2] == "Dead":
                    continue
                found.append(Group(group_id, role, str(info[2]), parse_members(info[5])))
    return tuple(found)


async def _lag(
    admin: AIOKafkaAdminClient,
    consumer: AIOKafkaConsumer,
    settings: Settings,
    groups: tuple[Group, ...],
    errors: list[str],
) -> tuple[PartitionLag, ...]:
    """Per group: the partitions its members own or it has committed, end vs committed."""
    wanted: dict[str, set[TopicPartition]] = {}
    owners: dict[tuple[str, str, int], str] = {}
    committed: dict[str, dict[TopicPartition, int]] = {}
    for role, group_id in role_groups(settings):
        tps: set[TopicPartition] = set()
        for group in groups:
            if group.group_id == group_id:
                for member in group.members:
                    for topic, partition in member.partitions:
                        tps.add(TopicPartition(topic, partition))
                        owners[(group_id, topic, partition)] = member.label
        try:
            offsets = await admin.list_consumer_group_offsets(group_id)
        except Exception as exc:
            errors.append(f"offsets of {group_id}: {exc}")
            offsets = {}
        committed[group_id] = {tp: o.offset for tp, o in offsets.items() if o.offset >= 0}
        tps |= set(committed[group_id])
        if role == "inference":
            for partition in await topic_partitions(consumer, settings.requests_topic):
                tps.add(TopicPartition(settings.requests_topic, partition))
        tps = {tp for tp in tps if not tp.topic.startswith(f"{settings.app_id}-")}  # internal
        if tps:
            wanted[group_id] = tps
    every = sorted({tp for tps in wanted.values() for tp in tps})
    ends = await consumer.end_offsets(every) if every else {}
    rows = []
    for group_id, tps in wanted.items():
        for tp in tps:
            rows.append(
                PartitionLag(
                    group_id,
                    tp.topic,
                    tp.partition,
                    int(ends.get(tp, 0)),
                    committed[group_id].get(tp),
                    owners.get((group_id, tp.topic, tp.partition)),
                )
            )
    return tuple(rows)


async def _recent(
    consumer: AIOKafkaConsumer,
    topic: str,
    per_partition: int | None,
    codec: AvroCodec,
    timeout_s: float = 10.0,
) -> list[dict[str, Any]] | None:
    """The last ``per_partition`` records of every partition of ``topic`` (all of them
    with None), decoded, each with ``_schema``; None if the topic does not exist. Stops
    after ``timeout_s`` with what it has read."""
    parts = await topic_partitions(consumer, topic)
    if not parts:
        return None
    tps = [TopicPartition(topic, p) for p in parts]
    consumer.assign(tps)
    begins = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    for tp in tps:
        start = begins[tp] if per_partition is None else max(begins[tp], ends[tp] - per_partition)
        consumer.seek(tp, start)
    records: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    remaining = {tp for tp in tps if ends[tp] > begins[tp]}
    while remaining and loop.time() < give_up:
        for tp, batch in (await consumer.getmany(*remaining, timeout_ms=500)).items():
            for record in batch:
                if record.offset >= ends[tp]:
                    continue
                try:
                    name, value = await adecode(codec, record.value)
                except (SchemaError, RegistryError):
                    continue  # not ours to show
                records.append({"_schema": name, **value})
            if await consumer.position(tp) >= ends[tp]:
                remaining.discard(tp)
    if remaining:
        logger.warning("%s: not read to its end within %.0f s", topic, timeout_s)
    return records
