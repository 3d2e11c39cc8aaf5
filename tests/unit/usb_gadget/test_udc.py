"""The host connection from the UDC's state attribute."""

from __future__ import annotations

import logging

import pytest

from firmware.usb_gadget.udc import UdcWatcher, connection_of, read_udc_state


@pytest.mark.parametrize(("state", "connection"), [
    ("not attached", "not-attached"), ("powered", "powered"), ("default", "powered"),
    ("addressed", "powered"), ("configured", "configured"), ("suspended", "suspended"),
    ("configured\n", "configured"), (None, "unknown"), ("something new", "unknown"),
])
def test_connection_of(state: str | None, connection: str) -> None:
    assert connection_of(state) == connection


def test_the_watcher_reports_each_change_once(caplog: pytest.LogCaptureFixture) -> None:
    states = {"dummy_udc.0": "not attached"}
    bound: list[str | None] = [None]
    seen: list[tuple[str, str]] = []
    w = UdcWatcher(lambda: bound[0], read=states.get,
                   changed=lambda old, new: seen.append((old, new)))
    caplog.set_level(logging.INFO, "mirrorunit.gadget")
    assert w.poll() == "not-attached" and w.changes == 1  # not bound: no host sees it
    bound[0] = "dummy_udc.0"
    for state in ("not attached", "default", "addressed", "configured", "configured",
                  "suspended", "configured", "not attached"):
        states["dummy_udc.0"] = state
        w.poll()
    assert seen == [("unknown", "not-attached"), ("not-attached", "powered"),
                    ("powered", "configured"), ("configured", "suspended"),
                    ("suspended", "configured"), ("configured", "not-attached")]
    assert w.status() == {"connection": "not-attached", "udc_state": "not attached",
                          "changes": 6}
    assert sum("host connection:" in r.message for r in caplog.records) == 6


def test_a_missing_udc_reads_as_none() -> None:
    # This machine may have no UDC at all; a name that cannot exist never does.
    assert read_udc_state("no-such-udc.99") is None
