"""``group_state`` reads a DescribeGroups response the way demo and bench need it."""

from __future__ import annotations

from types import SimpleNamespace

from streams.kafka_clients import group_state


class _Admin:
    def __init__(self, *groups: tuple) -> None:
        self._groups = list(groups)

    async def describe_consumer_groups(self, ids: list[str]) -> list[SimpleNamespace]:
        return [SimpleNamespace(groups=self._groups)]


async def test_the_asked_group_with_its_state_and_members() -> None:
    admin = _Admin(
        (0, "other", "Stable", "consumer", "range", ["m1", "m2", "m3"]),
        (0, "sluice", "Stable", "consumer", "range", ["m1", "m2"]),
    )
    assert await group_state(admin, "sluice") == ("Stable", 2)
    assert await group_state(admin, "other") == ("Stable", 3)


async def test_an_unknown_or_dead_group_is_none_and_rebalancing_is_reported() -> None:
    assert await group_state(_Admin((0, "sluice", "Dead", "", "", [])), "sluice") is None
    assert await group_state(_Admin(), "sluice") is None
    rebalancing = _Admin((0, "sluice", "PreparingRebalance", "consumer", "", ["m1"]))
    assert await group_state(rebalancing, "sluice") == ("PreparingRebalance", 1)
