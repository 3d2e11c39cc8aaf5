"""The status answer's shape: what the readers rely on is checked once, at the boundary."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from firmware.control.status import (
    StatusShapeError,
    read_local_status,
    read_ups_report,
)
from tests.support.status import local_status, peer


def answer(**kw: Any) -> dict[str, Any]:
    return copy.deepcopy(dict(local_status(**kw)))


def test_a_complete_answer_is_read_unchanged() -> None:
    a = answer(peers={"r1": peer()}, ups_flags="OB DISCHRG")
    assert read_local_status(a) is a


def test_keys_a_newer_unit_adds_are_kept() -> None:
    a = answer()
    a["panel"] = {"anything": [1, 2]}
    a["cbq"]["new_counter"] = "x"
    assert read_local_status(a)["cbq"]["fill"] == 0.1


@pytest.mark.parametrize("change,where", [
    (lambda a: a.pop("cbq"), "status.cbq: missing"),
    (lambda a: a["cbq"].pop("fill"), "status.cbq.fill: missing"),
    (lambda a: a["cbq"].__setitem__("fill", "90%"), "status.cbq.fill: expected float"),
    (lambda a: a["cbq"]["consumers"]["remote"].__setitem__("needs_resync", 1),
     "status.cbq.consumers.remote.needs_resync: expected bool"),
    # a bool is not an integer here, though Python says it is one
    (lambda a: a["volume"].__setitem__("size", True), "status.volume.size: expected int"),
    (lambda a: a["link"]["peers"]["r1"].__setitem__("state", None),
     "status.link.peers.r1.state: expected str"),
    (lambda a: a["link"].__setitem__("peers", [{"state": "connected"}]),
     "status.link.peers: expected an object"),
    (lambda a: a.__setitem__("ups", "OL"), "status.ups: expected an object"),
    (lambda a: a["cbq"].__setitem__("oldest_queued_ns", "soon"),
     "status.cbq.oldest_queued_ns: str 'soon' is none of"),
    (lambda a: a["cbq"].__setitem__("discards", {}), "status.cbq.discards: expected a list"),
])
def test_a_misshapen_answer_is_refused_naming_the_field(change: Any, where: str) -> None:
    a = answer(peers={"r1": peer()}, ups_flags="OL")
    change(a)
    with pytest.raises(StatusShapeError) as e:
        read_local_status(a)
    assert where in str(e.value)


def test_optional_parts_and_null_fields() -> None:
    a = answer()
    assert "link" not in a and "ups" not in a and a["nbd"] is None
    read_local_status(a)
    a["nbd"] = {"address": "127.0.0.1:10809", "export": "x", "connections": 0}
    read_local_status(a)
    a["nbd"] = {"address": "127.0.0.1:10809"}
    with pytest.raises(StatusShapeError, match=r"status\.nbd: .*none of"):
        read_local_status(a)


def test_a_ups_process_answer_and_its_extra_fields() -> None:
    u = dict(answer(ups_flags="OL")["ups"])
    assert read_ups_report(u) is u
    u["config_generation"] = "3"
    with pytest.raises(StatusShapeError, match=r"ups\.config_generation: expected int"):
        read_ups_report(u)
    with pytest.raises(StatusShapeError, match="ups: expected an object"):
        read_ups_report(None)
