"""One error tree: every exception firmware/ defines roots in MirrorUnitError, and a class
whose name ends in Error is an exception (events and frames are named for what they are)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import firmware
from firmware.errors import MirrorUnitError

#: Exceptions that must stay outside the tree: a simulated power cut has to escape every
#: handler as a real one would, and the bulk loop's interrupt is control flow, not an error.
OUTSIDE_THE_TREE = {"firmware.storage.PowerCut", "firmware.usb_gadget.bulk._Interrupted"}


def _classes() -> list[type]:
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(firmware.__path__, "firmware."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return list(found.values())


def test_every_exception_roots_in_mirrorunit_error() -> None:
    stray = [f"{c.__module__}.{c.__qualname__}" for c in _classes()
             if issubclass(c, Exception) and not issubclass(c, MirrorUnitError)
             and f"{c.__module__}.{c.__qualname__}" not in OUTSIDE_THE_TREE]
    assert not stray, f"exceptions outside the MirrorUnitError tree: {stray}"


def test_only_exceptions_are_named_error() -> None:
    misnamed = [f"{c.__module__}.{c.__qualname__}" for c in _classes()
                if c.__name__.endswith("Error") and not issubclass(c, BaseException)]
    assert not misnamed, f"named *Error but not exceptions: {misnamed}"
