"""The control socket: refusals are answers, handler bugs are logged with a traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.control.socket import ControlError, ControlServer, call


def _refuse() -> None:
    raise ControlError("not now")


def _buggy() -> None:
    raise KeyError("missing")


def _buggy_call() -> None:
    len(None)  # type: ignore[arg-type]  # a TypeError inside, not a bad argument


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(tmp_path / "control.sock", {
        "echo": lambda value: value,
        "refuse": _refuse,
        "buggy": _buggy,
        "buggy_call": _buggy_call,
        "unencodable": lambda: object(),
    })
    srv.start()
    yield srv
    srv.stop()


def test_a_handler_bug_is_logged_with_its_traceback_and_answered(
        server: ControlServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mirrorunit.control"):
        with pytest.raises(ControlError, match=r"buggy: internal error: KeyError"):
            call(server.path, "buggy")
    [rec] = [r for r in caplog.records if "buggy" in r.getMessage()]
    assert rec.levelno == logging.ERROR
    assert rec.exc_info is not None and rec.exc_info[0] is KeyError
    assert call(server.path, "echo", value=7) == 7  # the unit keeps serving


def test_a_type_error_inside_a_handler_is_a_bug_not_bad_arguments(
        server: ControlServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mirrorunit.control"):
        with pytest.raises(ControlError, match=r"internal error: TypeError"):
            call(server.path, "buggy_call")
    assert any(r.exc_info for r in caplog.records)
    with pytest.raises(ControlError, match=r"echo: bad arguments"):
        call(server.path, "echo", wrong=1)


def test_a_refusal_is_answered_without_a_traceback(
        server: ControlServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mirrorunit.control"):
        with pytest.raises(ControlError, match=r"^refuse: not now$"):
            call(server.path, "refuse")
    [rec] = [r for r in caplog.records if "refuse" in r.getMessage()]
    assert rec.levelno == logging.WARNING and not rec.exc_info


def test_a_result_cbor_cannot_carry_is_answered_as_an_internal_error(
        server: ControlServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mirrorunit.control"):
        with pytest.raises(ControlError, match=r"unencodable: internal error"):
            call(server.path, "unencodable")
    assert any(r.exc_info for r in caplog.records)
    assert call(server.path, "echo", value="still here") == "still here"
