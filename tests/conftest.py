"""The `vm` marker and the shared QEMU guest fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.vm import GuestVM, VMConfig, missing_requirements


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots a QEMU guest (Linux usb-storage against our gadget)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("vm") for item in items):
        return
    reason = missing_requirements()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"no VM: {reason}")
    for item in items:
        if item.get_closest_marker("vm"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def guest_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVM]:
    """One booted guest per test module (booting takes seconds under TCG)."""
    workdir = tmp_path_factory.mktemp("vm")
    if "," in str(workdir) or " " in str(workdir):
        pytest.fail(f"VM work directory {workdir} must not contain ',' or spaces (QEMU options)")
    vm = GuestVM(workdir, VMConfig())
    with vm:
        print(f"guest booted in {vm.boot_seconds:.1f}s")
        yield vm


@pytest.fixture()
def fake_networkctl(tmp_path: Path) -> tuple[Path, Path]:
    """A networkctl stand-in that logs its arguments to the returned log file, and
    fails (as a timed-out reload does) while tmp_path/FAIL exists."""
    log = tmp_path / "networkctl.log"
    script = tmp_path / "networkctl"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                      f"if [ -e {tmp_path / 'FAIL'} ]; then\n"
                      "  echo 'Failed to reload network settings: Connection timed out' >&2\n"
                      "  exit 1\nfi\n")
    script.chmod(0o755)
    return script, log
