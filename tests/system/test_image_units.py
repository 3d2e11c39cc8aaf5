"""The systemd units and helper scripts of the image, checked from the source tree."""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

import pytest

from image import build
from tests.support import REPO

UNITS = REPO / "image/units"
LIB = REPO / "image/rootfs/usr/lib/mirrorunit"

#: unit -> the `mirrorunit` command it runs
ROLE_UNITS = {
    "mirrorunit-gadget.service": "mirrorunit gadget up",
    "mirrorunit-local.service": "mirrorunit appliance local",
    "mirrorunit-remote.service": "mirrorunit appliance remote",
    "mirrorunit-ups.service": "mirrorunit ups",
    "mirrorunit-notify.service": "mirrorunit notify",
}


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd keys repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("unit, command", sorted(ROLE_UNITS.items()))
def test_role_unit_runs_its_command_and_cannot_crash_loop(unit: str, command: str) -> None:
    u = read_unit(UNITS / unit)
    svc, top = u["Service"], u["Unit"]
    assert svc["ExecStart"][-1].startswith("/usr/bin/" + command)
    # a build without the role's code skips the unit instead of failing it
    guards = top.get("ConditionPathExists", [])
    assert any(g.startswith("@PYLIB@/firmware/") and g.endswith("/cli.py") for g in guards)
    restart = svc.get("Restart", ["no"])[-1]
    if restart != "no":
        assert int(top["StartLimitBurst"][-1]) <= 5
        assert "2" in svc["RestartPreventExitStatus"][-1].split()
    assert unit in build.ENABLED_UNITS


def test_gadget_is_a_oneshot_skipped_without_a_udc() -> None:
    u = read_unit(UNITS / "mirrorunit-gadget.service")["Service"]
    assert u["Type"] == ["oneshot"] and "Restart" not in u
    assert u["ExecCondition"] == ["/usr/lib/mirrorunit/have-udc"]
    assert u["ExecStop"] == ["/usr/bin/mirrorunit gadget down"]


def test_have_udc_says_clearly_that_none_exists(tmp_path: Path) -> None:
    env = {**os.environ, "MIRRORUNIT_UDC_DIR": str(tmp_path)}
    r = subprocess.run(["sh", str(LIB / "have-udc")], env=env, capture_output=True, text=True)
    assert r.returncode == 1  # ExecCondition: 1..254 skips the unit, it does not fail
    assert "no USB device controller (UDC)" in r.stderr
    (tmp_path / "fe980000.usb").mkdir()
    r = subprocess.run(["sh", str(LIB / "have-udc")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == ""


def test_getty_dropin_replaces_the_login_with_the_console() -> None:
    u = read_unit(UNITS / "getty-dropins/mirrorunit-console.conf")["Service"]
    assert u["ExecStart"][0] == ""  # clears agetty before adding ours
    assert u["ExecStart"][1:] == ["-/usr/lib/mirrorunit/console-launch %I"]
    code = [ln for ln in (LIB / "console-launch").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]
    for forbidden in ("agetty", "/bin/login", "sulogin", "exec sh", "exec /bin/sh", "bash"):
        assert not any(forbidden in ln for ln in code), forbidden


def test_var_overlay_keeps_its_upper_layer_in_ram() -> None:
    cp = configparser.ConfigParser()
    cp.read_string((UNITS / "var.mount").read_text())
    opts = dict(o.split("=", 1) for o in cp["Mount"]["Options"].split(","))
    assert cp["Mount"]["Where"] == "/var" and cp["Mount"]["Type"] == "overlay"
    assert opts["lowerdir"] == "/var"
    assert opts["upperdir"].startswith("/run/") and opts["workdir"].startswith("/run/")


def test_every_shipped_unit_is_enabled_or_deliberately_not() -> None:
    shipped = {p.name for p in UNITS.glob("*.*")}
    helpers = {"mirrorunit-overlay-dirs.service"}  # pulled in by var.mount
    assert shipped - helpers <= set(build.ENABLED_UNITS)
