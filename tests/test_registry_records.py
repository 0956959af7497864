"""The registry's hot path validates a heartbeat's record once while it repeats
(:class:`eda.core.registry.model.Records`): every answer must be the one
:func:`~eda.core.registry.model.from_dict` gives, whatever came before it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eda.core.registry import model, protocol


def record(**kw: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "service": "orders", "id": "orders-1", "host": "10.0.0.1", "port": 8080,
        "weight": 1, "ttl": 3.0, "interval": 1.0, "meta": {"version": "2"}, "rev": 4,
        "registered": 1000, "heartbeat": 1000.5,
    }  # fmt: skip
    data.update(kw)
    return data


def outcome(call: Any, data: Any) -> Any:
    """What validating *data* gives: the record's fields, or the refusal's class and text."""
    try:
        return call(data).to_dict()
    except model.InvalidRecord as exc:
        return (type(exc).__name__, str(exc))


@pytest.mark.parametrize(
    "field, good, bad",
    [
        ("port", 1, True),  # True == 1 and 1.0 == 1 in Python: validation tells them apart
        ("port", 8080, 8080.0),
        ("weight", 1, True),
        ("weight", 0, False),
        ("weight", 1, 1.0),
        ("rev", 4, 4.0),
        ("ttl", 1, True),
        ("registered", 1, True),
        ("meta", {"version": "2"}, {"version": 2}),
    ],
)
def test_a_record_equal_to_a_valid_one_in_value_but_not_in_type_is_still_refused(
    field: str, good: Any, bad: Any
) -> None:
    records = model.Records()
    records.from_dict(record(**{field: good, "interval": 0.5}))
    records.from_dict(record(**{field: good, "interval": 0.5}))  # answered from memory
    refused = record(**{field: bad, "interval": 0.5})
    with pytest.raises(model.InvalidRecord):
        records.from_dict(refused)
    assert outcome(records.from_dict, refused) == outcome(model.from_dict, refused)


def test_a_repeated_record_gives_a_record_of_its_own() -> None:
    records = model.Records()
    first = records.from_dict(record())
    first.rev, first.registry = 99, "elsewhere"  # the store changes what it keeps
    again = records.from_dict(record())
    assert again is not first
    assert again.to_dict() == model.from_dict(record()).to_dict()


def test_heartbeats_through_the_request_parser_use_the_records_given() -> None:
    records = model.Records()
    msg = {"op": "heartbeat", "instance": record(), "rid": 7}
    req = protocol.request_from(msg, records)
    assert req.instance is not None and "orders-1" in records.known
    assert protocol.request_from(dict(msg), records) == protocol.request_from(dict(msg))


def test_the_records_remembered_are_bounded() -> None:
    records = model.Records(size=3)
    for i in range(10):
        records.from_dict(record(id=f"i{i}"))
    assert list(records.known) == ["i7", "i8", "i9"]


_values = st.one_of(
    st.booleans(), st.integers(-2, 70000), st.floats(allow_nan=True), st.text(max_size=5),
    st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(), max_size=2),
)  # fmt: skip


@given(st.lists(st.tuples(st.sampled_from([*sorted(record()), "status", "key"]), _values),
                max_size=6))  # fmt: skip
def test_any_sequence_of_records_is_answered_as_from_dict_answers_it(
    changes: list[tuple[str, Any]],
) -> None:
    records = model.Records()
    data = record()
    assert outcome(records.from_dict, data) == outcome(model.from_dict, data)
    for field, value in changes:
        data = {**copy.deepcopy(data), field: value}
        assert outcome(records.from_dict, data) == outcome(model.from_dict, data)
        again = copy.deepcopy(data)
        assert outcome(records.from_dict, again) == outcome(model.from_dict, again)


@given(st.dictionaries(st.sampled_from(["a", "version", "zone"]), st.text(max_size=4), max_size=3),
       st.sampled_from(model.STATUSES), st.integers(0, 2**53 - 1))  # fmt: skip
def test_a_record_as_json_sends_it_is_what_asdict_gives(
    meta: dict[str, str], status: str, rev: int
) -> None:
    """to_dict is written out for speed: it must stay asdict's answer, field for field and
    in the same order (a field added to Instance and not to to_dict fails here)."""
    import dataclasses

    inst = model.from_dict(record(meta=meta, status=status, rev=rev, key=""))
    written = inst.to_dict()
    assert list(written.items()) == list(dataclasses.asdict(inst).items())
    written["meta"]["other"] = "x"  # a copy: what a caller does to it stays there
    assert "other" not in inst.meta
