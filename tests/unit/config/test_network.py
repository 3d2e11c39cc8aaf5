"""Network settings applied to the system: the systemd-networkd file rendered from the
config, written atomically, and networkctl driven through a fake runner or a fake
command; a failing networkctl is reported and the saved config stays."""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from firmware.cli import main as cli_main
from firmware.config import Config, ConfigStore, StoreSettings
from firmware.config.errors import NetworkApplyError
from firmware.config.live import apply_live
from firmware.config.network import (
    CommandResult,
    NetworkHook,
    NetworkSettings,
    apply_by_default,
    apply_network,
    render_network,
    wired_links,
    write_atomically,
)
from firmware.config.schema import diff_live
from tests.support import REPO


def body(text: str) -> list[str]:
    """The file without its comment header."""
    return [ln for ln in text.splitlines() if not ln.startswith("#")]


def cfg(**values: Any) -> Config:
    return Config.defaults().replace({f"network.{k}": v for k, v in values.items()})


HEAD = ["[Match]", "Name=eth* en*", "", "[Network]"]


@pytest.mark.parametrize("values,expected", [
    ({}, HEAD + ["DHCP=yes"]),
    ({"dns": ["192.0.2.53"]},
     HEAD + ["DHCP=yes", "DNS=192.0.2.53", "", "[DHCPv4]", "UseDNS=no", "", "[DHCPv6]",
             "UseDNS=no"]),
    ({"mode": "static", "address": "10.1.2.3", "netmask": "255.255.255.0"},
     HEAD + ["DHCP=no", "Address=10.1.2.3/24"]),
    ({"mode": "static", "address": "10.1.2.3", "netmask": "16", "gateway": "10.1.0.1"},
     HEAD + ["DHCP=no", "Address=10.1.2.3/16", "Gateway=10.1.0.1"]),
    ({"mode": "static", "address": "10.1.2.3", "netmask": "24", "gateway": "10.1.2.254",
      "dns": ["10.1.2.53", "9.9.9.9"]},
     HEAD + ["DHCP=no", "Address=10.1.2.3/24", "Gateway=10.1.2.254", "DNS=10.1.2.53",
             "DNS=9.9.9.9"]),
    ({"mode": "static", "address": "10.9.9.9", "netmask": "32"},
     HEAD + ["DHCP=no", "Address=10.9.9.9/32"]),
    ({"mode": "static", "address": "2001:DB8::5", "netmask": "64", "gateway": "2001:db8::1",
      "dns": ["2001:4860:4860::8888"]},
     HEAD + ["DHCP=no", "Address=2001:db8::5/64", "Gateway=2001:db8::1",
             "DNS=2001:4860:4860::8888"]),
])
def test_render_table(values: dict[str, Any], expected: list[str]) -> None:
    text = render_network(cfg(**values))
    assert body(text) == expected
    assert text.endswith("\n") and text.startswith("# Written by mirrorunit")


def test_render_matches_what_it_is_told() -> None:
    assert "Name=end0\n" in render_network(cfg(), match=("end0",))


def test_atomic_write_replaces_whole_files_and_reports_no_change(tmp_path: Path) -> None:
    path = tmp_path / "run/systemd/network/10-mirrorunit.network"
    assert write_atomically(path, "one\n")  # parents created
    inode = path.stat().st_ino
    assert not write_atomically(path, "one\n")
    assert path.stat().st_ino == inode  # untouched when equal
    assert write_atomically(path, "two\n")
    assert path.read_text() == "two\n"
    assert path.stat().st_ino != inode  # a new file renamed over: never half written
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp left


class FakeRunner:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        if self.fail is not None and self.fail in argv:
            return CommandResult(1, "Failed to reload network settings: Unit "
                                    "dbus-org.freedesktop.network1.service not found.")
        return CommandResult(0, "")


@pytest.fixture()
def settings(tmp_path: Path) -> NetworkSettings:
    net = tmp_path / "sys/class/net"
    for name in ("lo", "eth0", "enp1s0", "wlan0", "end0", "docker0"):
        (net / name).mkdir(parents=True)
    return NetworkSettings(path=str(tmp_path / "run/10-mirrorunit.network"),
                           networkctl=("netctl", "--no-pager"), sys_class_net=str(net))


def test_wired_links(settings: NetworkSettings) -> None:
    assert wired_links(settings) == ["end0", "enp1s0", "eth0"]


def test_apply_writes_then_reloads_then_reconfigures(settings: NetworkSettings) -> None:
    runner = FakeRunner()
    static = cfg(mode="static", address="10.0.0.5", netmask="24")
    done = apply_network(static, settings, runner)
    assert runner.calls == [["netctl", "--no-pager", "reload"],
                            ["netctl", "--no-pager", "reconfigure", "end0", "enp1s0", "eth0"]]
    assert "Address=10.0.0.5/24" in Path(settings.path).read_text()
    assert done.changed and done.describe().startswith("networkd reconfigured")
    # The same settings again: nothing to do, nothing run.
    runner.calls.clear()
    assert not apply_network(static, settings, runner).changed
    assert runner.calls == []
    # At boot, before networkd runs: the file only.
    apply_network(cfg(), settings, runner, reload=False)
    assert runner.calls == [] and "DHCP=yes" in Path(settings.path).read_text()


def test_no_wired_link_means_reload_only(settings: NetworkSettings, tmp_path: Path) -> None:
    runner = FakeRunner()
    bare = NetworkSettings(path=settings.path, sys_class_net=str(tmp_path / "nothing"))
    apply_network(cfg(), bare, runner)
    assert runner.calls == [["networkctl", "reload"]]


@pytest.mark.parametrize("failing", ["reload", "reconfigure"])
def test_failing_networkctl_is_named(settings: NetworkSettings, failing: str) -> None:
    runner = FakeRunner(fail=failing)
    with pytest.raises(NetworkApplyError) as ei:
        apply_network(cfg(), settings, runner)
    msg = str(ei.value)
    assert f"`netctl --no-pager {failing}" in msg
    assert "dbus-org.freedesktop.network1.service not found" in msg
    assert runner.calls[-1][2] == failing  # nothing run after the failure
    assert "DHCP=yes" in Path(settings.path).read_text()  # the file is there for the boot


def test_unwritable_directory_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    settings = NetworkSettings(path=str(blocker / "x.network"))
    with pytest.raises(NetworkApplyError, match="cannot write"):
        apply_network(cfg(), settings, FakeRunner())


def test_live_report_for_network_keys(settings: NetworkSettings) -> None:
    old = Config.defaults()
    new = cfg(mode="static", address="10.0.0.5", netmask="24")
    diff = diff_live(old, new)
    runner = FakeRunner()
    report = apply_live(diff, new, None, network=NetworkHook(settings, runner))
    assert [k for k, _ in report.applied] == ["network.mode", "network.address",
                                              "network.netmask"]
    assert len(runner.calls) == 2  # one reload for the three keys
    no_hook = apply_live(diff, new, None)
    assert no_hook.restart == [(k, "stored; applied to the system at the next boot")
                               for k in ("network.mode", "network.address",
                                         "network.netmask")]
    failed = apply_live(diff, new, None, network=NetworkHook(settings, FakeRunner("reload")))
    assert [k for k, _ in failed.errors] == ["network.mode", "network.address",
                                             "network.netmask"]
    assert not failed.applied
    assert all("saved, in effect from the next boot" in m for _, m in failed.errors)


def test_apply_by_default() -> None:
    assert apply_by_default({"MIRRORUNIT_APPLY_NETWORK": "1"})
    assert not apply_by_default({"MIRRORUNIT_APPLY_NETWORK": "no"})


# ------------------------------------------------------------------ command line


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_config_set_applies_and_a_failure_keeps_the_saved_config(
        tmp_path: Path, fake_networkctl: tuple[Path, Path], settings: NetworkSettings,
        capsys: pytest.CaptureFixture[str]) -> None:
    script, log = fake_networkctl
    slots = tmp_path / "config.slots"
    opts = ["--config", str(slots), "--apply-network", "--network-file", settings.path,
            "--networkctl", str(script),
            "--sys-class-net", settings.sys_class_net]
    rc, out, _ = run_cli(["config", "set", *opts, "network.dns", "192.0.2.53"], capsys)
    assert rc == 0, out
    assert "applied   network.dns: networkd reconfigured" in out
    assert log.read_text().splitlines() == ["reload", "reconfigure end0 enp1s0 eth0"]
    assert "DNS=192.0.2.53" in Path(settings.path).read_text()
    # networkctl fails: the setting is saved all the same and the failure is named.
    (tmp_path / "FAIL").write_text("")
    rc, out, _ = run_cli(["config", "set", *opts, "network.dns", "192.0.2.54"], capsys)
    assert rc == 1
    assert "FAILED    network.dns: `networkctl reload` failed: Failed to reload network " \
        "settings: Connection timed out; saved, in effect from the next boot" in out
    loaded = ConfigStore(StoreSettings(str(slots))).load()
    assert loaded.config is not None and loaded.config["network.dns"] == ["192.0.2.54"]
    # Switched off (a workstation): stored, nothing run.
    before = log.read_text()
    rc, out, _ = run_cli(["config", "set", "--config", str(slots), "--no-apply-network",
                          "--networkctl", str(script), "network.dns", "192.0.2.55"], capsys)
    assert rc == 0 and "restart   network.dns: stored; applied to the system at the next " \
        "boot" in out
    assert log.read_text() == before


def test_apply_network_command_at_boot(tmp_path: Path, fake_networkctl: tuple[Path, Path],
                                       settings: NetworkSettings,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    script, log = fake_networkctl
    slots = tmp_path / "config.slots"
    base = ["config", "apply-network", "--config", str(slots), "--network-file",
            settings.path, "--networkctl", str(script), "--sys-class-net",
            settings.sys_class_net]
    # Never configured: DHCP, so the unit can reach a peer to recover from.
    rc, out, err = run_cli([*base, "--write-only"], capsys)
    assert rc == 0 and "config partition is blank; using DHCP" in err
    assert "DHCP=yes" in Path(settings.path).read_text()
    assert not log.exists()
    ConfigStore(StoreSettings(str(slots))).set_many(
        {"network.mode": "static", "network.address": "192.0.2.7", "network.netmask": "24",
         "network.gateway": "192.0.2.1"})
    rc, out, _ = run_cli([*base, "--write-only"], capsys)
    assert rc == 0 and "network: static; written to" in out
    assert "Gateway=192.0.2.1" in Path(settings.path).read_text()
    rc, out, _ = run_cli(base, capsys)
    assert rc == 0 and log.read_text().splitlines()[0] == "reload"
    (tmp_path / "FAIL").write_text("")
    rc, _, err = run_cli(base, capsys)
    assert rc == 1 and "Connection timed out" in err


def test_network_unit_file_runs_before_networkd() -> None:
    root = REPO
    text = (root / "image/units/mirrorunit-network.service").read_text()
    assert "Before=systemd-networkd.service" in text
    assert "mirrorunit config apply-network --write-only" in text
    assert "WantedBy=" in text
    assert "ExecStart=/usr/bin/mirrorunit config apply-network" in text
