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
    "mirrorunit-panel.service": "mirrorunit panel",
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
    assert unit in build.ENABLED_UNITS or unit in build.BOARD_UNITS


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
    assert shipped - helpers <= set(build.ENABLED_UNITS) | set(build.BOARD_UNITS)


def test_panel_unit_is_enabled_only_where_the_board_has_a_panel() -> None:
    from image import profile

    pi4 = profile.load("pi4")
    assert pi4.panel == profile.Panel("/dev/ttyACM0", 115200)
    assert "mirrorunit-panel.service" in build.enabled_units(pi4)
    boards = [profile.load(p.stem) for p in (REPO / "board").glob("*.toml")
              if "supported = true" in p.read_text()]
    for board in boards:
        if board.panel is None:
            assert "mirrorunit-panel.service" not in build.enabled_units(board), board.name
    text = build._subst((UNITS / "mirrorunit-panel.service").read_text(), pi4)
    assert "--device /dev/ttyACM0 --baud 115200" in text and "@PANEL" not in text


#: unit -> the capabilities it keeps (docs/image.md, "Locked down")
SANDBOXED = {
    "mirrorunit-local.service": {"CAP_SYS_ADMIN"},
    "mirrorunit-remote.service": {"CAP_SYS_ADMIN"},
    "mirrorunit-notify.service": set(),
    "mirrorunit-ups.service": set(),
    "mirrorunit-panel.service": set(),
}


EXTRA_WRITABLE = {"mirrorunit-panel.service": ["-/run/systemd/network"]}


@pytest.mark.parametrize("unit", sorted(SANDBOXED))
def test_role_unit_is_sandboxed(unit: str) -> None:
    svc = read_unit(UNITS / unit)["Service"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes")):
        assert svc.get(key) == [value], (unit, key)
    caps = set(svc["CapabilityBoundingSet"][-1].split())
    assert caps == SANDBOXED[unit]
    assert "AmbientCapabilities" not in svc or svc["AmbientCapabilities"] == [""]
    assert 0 < int(svc["TasksMax"][-1]) <= 1024
    assert 0 < int(svc["LimitNOFILE"][-1]) <= 8192
    # only the config partition is writable beyond the unit's runtime directory (and,
    # for the panel, which applies a network change as the console does, networkd's
    # runtime file)
    allowed = EXTRA_WRITABLE.get(unit, [])
    assert svc.get("ReadWritePaths", []) in ([], ["/config"], ["/config", *allowed])


def test_shadow_check_refuses_open_accounts() -> None:
    locked = "root:!*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
    build.check_shadow(locked)
    for bad in ("root::19000:0:99999:7:::\n",  # empty: no password at all
                "root:!*:19000::::::\nbin::19000::::::\n",
                "root:$y$j9T$abc$def:19000::::::\n",
                "daemon:*:19000::::::\n"):  # no root entry to have locked
        with pytest.raises(build.BuildError):
            build.check_shadow(bad)


def test_lock_accounts_locks_root(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    for field in ("", "*"):
        shadow.write_text(f"root:{field}:19000:0:99999:7:::\nnobody:*:19000::::::\n")
        build.lock_accounts(shadow)
        assert shadow.read_text().splitlines()[0].split(":")[1] == "!*"
    shadow.write_text("root:$6$salt$hash:19000::::::\n")
    with pytest.raises(build.BuildError):
        build.lock_accounts(shadow)


def test_image_packages_are_pinned_and_bring_rpi_gpio() -> None:
    pins = dict(p.split("==") for p in build.image_packages())
    assert pins["rpi-lgpio"] == "0.6" and "lgpio" in pins
