"""Fast pre-write checks for what fastavro's writer accepts silently.

fastavro's writer truncates a float written to an ``int``, writes ``int`` values outside 32
bits (bytes other Avro readers reject), takes any truthy value as ``true`` and writes a string
given for an array as its characters. ``fastavro.validation.validate`` catches all that but
costs several times the write, so the codec compiles a schema into small closures that check
those cases (and name the field) in a fraction of it. Unions are left to the writer, which
picks a branch with fastavro's own validation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Check = Callable[[Any], None]

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_ABSENT = object()


class Invalid(Exception):
    """A value does not fit the schema; ``path`` leads from the record to the value."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []

    def describe(self, root: str) -> str:
        where = root + "".join(self.path)
        return f"field {where} {self.message}" if self.path else f"{root} {self.message}"


def _got(value: Any) -> str:
    return f"{value!r:.60} of type {type(value).__name__}"


def _null(value: Any) -> None:
    if value is not None:
        raise Invalid(f"is {_got(value)} (expected null)")


def _boolean(value: Any) -> None:
    if value is not True and value is not False:
        raise Invalid(f"is {_got(value)} (expected boolean)")


def _int(value: Any) -> None:
    if type(value) is not int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(f"is {_got(value)} (expected int)")
    if not _INT_MIN <= value <= _INT_MAX:
        raise Invalid(f"is {value}, outside the 32-bit range of int")


def _long(value: Any) -> None:
    if type(value) is not int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(f"is {_got(value)} (expected long)")
    if not _LONG_MIN <= value <= _LONG_MAX:
        raise Invalid(f"is {value}, outside the 64-bit range of long")


def _floating(kind: str) -> Check:
    def check(value: Any) -> None:
        if type(value) is not float and (
            not isinstance(value, int | float) or isinstance(value, bool)
        ):
            raise Invalid(f"is {_got(value)} (expected {kind})")

    return check


def _string(value: Any) -> None:
    if type(value) is not str and not isinstance(value, str):
        raise Invalid(f"is {_got(value)} (expected string)")


def _bytes(value: Any) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise Invalid(f"is {_got(value)} (expected bytes)")


def _no_check(value: Any) -> None:
    return None


_PRIMITIVES: dict[str, Check] = {
    "null": _null,
    "boolean": _boolean,
    "int": _int,
    "long": _long,
    "float": _floating("float"),
    "double": _floating("double"),
    "string": _string,
    "bytes": _bytes,
}


def compile_checks(parsed: Mapping[str, Any]) -> Check:
    """A check for records of the fastavro-parsed (and logical-type-free) schema ``parsed``."""
    named: Mapping[str, Any] = parsed.get("__named_schemas", {})
    compiled: dict[str, Check] = {}

    def by_name(name: str) -> Check:
        if name in compiled:
            return compiled[name]
        holder: list[Check] = []

        def deferred(value: Any) -> None:  # recursive types: compiled on first use
            holder[0](value)

        compiled[name] = deferred
        holder.append(build(named[name]))
        compiled[name] = holder[0]
        return holder[0]

    def build(schema: Any) -> Check:
        if isinstance(schema, str):
            primitive = _PRIMITIVES.get(schema)
            if primitive is not None:
                return primitive
            return by_name(schema) if schema in named else _no_check
        if isinstance(schema, list):
            return _no_check  # unions: the writer checks the branch it picks
        kind = schema.get("type")
        if kind in ("record", "error"):
            return _record(schema)
        if kind == "array":
            return _array(build(schema["items"]))
        if kind == "map":
            return _map(build(schema["values"]))
        if kind == "enum":
            return _enum(schema)
        if kind == "fixed":
            return _fixed(schema)
        return build(kind) if isinstance(kind, str | list | dict) else _no_check

    def _record(schema: Mapping[str, Any]) -> Check:
        fields = [
            (field["name"], build(field["type"]), "default" in field) for field in schema["fields"]
        ]

        def check(value: Any) -> None:
            if not isinstance(value, Mapping):
                raise Invalid(f"is {_got(value)} (expected a {schema['name']} record)")
            for name, field_check, has_default in fields:
                field_value = value.get(name, _ABSENT)
                if field_value is _ABSENT:
                    if has_default or field_check is _no_check:
                        continue  # the writer uses the default, or null for a union
                    exc = Invalid("is missing and has no default")
                    exc.path.append(f".{name}")
                    raise exc
                try:
                    field_check(field_value)
                except Invalid as exc:
                    exc.path.insert(0, f".{name}")
                    raise

        return check

    return build(parsed)


def _array(item_check: Check) -> Check:
    def check(value: Any) -> None:
        if not isinstance(value, Sequence) or isinstance(value, str | bytes | bytearray):
            raise Invalid(f"is {_got(value)} (expected an array)")
        if item_check is _no_check:
            return
        for index, item in enumerate(value):
            try:
                item_check(item)
            except Invalid as exc:
                exc.path.insert(0, f"[{index}]")
                raise

    return check


def _map(value_check: Check) -> Check:
    def check(value: Any) -> None:
        if not isinstance(value, Mapping):
            raise Invalid(f"is {_got(value)} (expected a map)")
        for key, item in value.items():
            if type(key) is not str:
                raise Invalid(f"has key {_got(key)} (map keys are strings)")
            try:
                value_check(item)
            except Invalid as exc:
                exc.path.insert(0, f"[{key!r}]")
                raise

    return check


def _enum(schema: Mapping[str, Any]) -> Check:
    symbols = frozenset(schema["symbols"])

    def check(value: Any) -> None:
        if not isinstance(value, str) or value not in symbols:
            raise Invalid(
                f"is {_got(value)} (expected a symbol of {schema['name']}: "
                f"{', '.join(schema['symbols'])})"
            )

    return check


def _fixed(schema: Mapping[str, Any]) -> Check:
    size = schema["size"]

    def check(value: Any) -> None:
        if not isinstance(value, bytes | bytearray) or len(value) != size:
            raise Invalid(f"is {_got(value)} (expected {size} bytes for {schema['name']})")

    return check
