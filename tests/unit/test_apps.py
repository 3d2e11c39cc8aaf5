"""The apps' settings builders: from the command line and from the Config, and the
command line the appliance shows for what it runs; the local unit runs what it is given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firmware.apps import local, remote
from firmware.cli import build_parser
from firmware.config.schema import Config
from firmware.local import LocalSettings, LocalUnit
from tests.support import REPO


def _local(argv: list[str]) -> local.LocalAppSettings:
    return local.settings_from_args(build_parser().parse_args(argv))


def _config(**fields: Any) -> Config:
    return Config.defaults().replace(fields)


def test_local_settings_from_the_config_run_what_the_shown_command_line_runs() -> None:
    cfg = _config(**{"cache.mode": "write-back", "buffer.high_water": 0.7,
                     "scsi.vendor": "ACME", "scsi.product": "Vault 9", "unit.serial": "SN42",
                     "peers": [{"name": "vault", "address": "10.0.0.2:7310",
                                "fingerprint": "ab" * 32},
                               {"name": "v6", "address": "[fd00::2]:7310",
                                "fingerprint": "cd" * 32}]})
    s = local.settings_from_config(cfg, disk="/dev/data", buffer="/dev/buf",
                                   store_path="/config/config.slots", state_dir=Path("/run/w"),
                                   control="/run/local.sock", peers=["vault", "v6"],
                                   disk_id="partuuid:d1", buffer_id="partuuid:b1")
    assert s.nbd is None and s.ups is None
    assert (s.unit.disk_id, s.unit.buffer_id) == ("partuuid:d1", "partuuid:b1")
    assert s.usb is not None and s.usb.gadget.serial_number == "SN42"
    assert [(r.name, r.host, r.port) for r in s.replication.remotes] == [
        ("vault", "10.0.0.2", 7310), ("v6", "fd00::2", 7310)]
    assert _local(local.command_line(s)) == s


def test_local_command_line_keeps_every_option_given() -> None:
    argv = ["local", "--disk", "d.img", "--size", "1M", "--buffer", "b.img",
            "--buffer-size", "4M", "--block-size", "4096", "--nbd", "127.0.0.1:0",
            "--export-name", "x", "--control", "c.sock", "--cache-mode", "write-through",
            "--cache-limit", "1M", "--high-water", "55%", "--peer", "a", "--peer", "b",
            "--standby", "--frontend", "usb", "--usb-configfs", "/cfs", "--usb-udc", "u.0",
            "--usb-vid", "0x1234", "--usb-pid", "0xabcd", "--usb-product", "P",
            "--usb-serial", "S1", "--scsi-revision", "0002", "--scsi-serial", "S2",
            "--lun-read-only", "--remote", "a=h:1", "--state-dir", "st", "--unit-id", "u",
            "--link-bandwidth", "2M", "--compression", "none", "--link-signature",
            "--config", "cfg.slots", "--ups-config", "ups.slots",
            "--ups-poweroff-command", "true", "--disk-id", "serial:X1", "--buffer-id",
            "partuuid:0a1b", "--device-wait", "7.5"]
    s = _local(argv)
    assert s.unit.peers == ("a", "b") and not s.replication.prune_default_consumer
    assert s.ups is not None and s.ups.poweroff_command == "true"
    assert (s.unit.disk_id, s.unit.buffer_id, s.unit.device_wait) == (
        "serial:X1", "partuuid:0a1b", 7.5)
    assert _local(local.command_line(s)) == s
    # with nothing but the required options, nothing but them is shown
    bare = _local(["local", "--disk", "d", "--buffer", "b"])
    assert local.command_line(bare) == [
        "local", "--disk", "d", "--buffer", "b", "--control", "/run/mirrorunit/local.sock",
        "--cache-mode", "write-through", "--high-water", "0.8"]


@pytest.mark.parametrize("bad, words", [(["--remote", "nohost"], "expected NAME=HOST:PORT"),
                                        (["--remote", "a=h:1", "--remote", "a=g:2"],
                                         "must be unique")])
def test_bad_remotes_are_refused_before_anything_opens(
        tmp_path: Path, bad: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    from firmware.cli import main

    assert main(["local", "--disk", str(tmp_path / "d"), "--buffer", str(tmp_path / "b"),
                 "--size", "1M", "--buffer-size", "4M", *bad]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_remote_settings_round_trip_through_the_shown_command_line(tmp_path: Path) -> None:
    s = remote.settings_from_config(Config.defaults(), store_path="/config/config.slots",
                                    state_dir=tmp_path / "w", store_dir=tmp_path / "store",
                                    control="/run/remote.sock")
    assert remote.settings_from_args(build_parser().parse_args(remote.command_line(s))) == s
    argv = ["remote", "--listen", "127.0.0.1:9", "--store", "st", "--commit-delay", "1.5",
            "--retention-bytes", "1M", "--retention-age", "60", "--pairing-window", "5"]
    t = remote.settings_from_args(build_parser().parse_args(argv))
    assert remote.settings_from_args(build_parser().parse_args(remote.command_line(t))) == t


class _Recorder:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def start(self) -> None:
        self.log.append(f"start {self.name}")

    def stop(self) -> None:
        self.log.append(f"stop {self.name}")

    def status(self) -> dict[str, Any]:
        return {"mine": self.name}

    def handlers(self) -> dict[str, Any]:
        return {f"{self.name}.ping": lambda: self.name}


def test_local_unit_runs_the_services_it_is_given(tmp_path: Path) -> None:
    from firmware.control import call

    log: list[str] = []
    unit = LocalUnit(LocalSettings(disk=tmp_path / "d", buffer=tmp_path / "b",
                                   control=tmp_path / "c.sock", size=1 << 20,
                                   buffer_size=4 << 20),
                     [_Recorder("one", log), _Recorder("two", log)])
    unit.start()
    try:
        status = call(tmp_path / "c.sock", "status")
        assert status["one"] == {"mine": "one"} and status["two"] == {"mine": "two"}
        assert status["nbd"] is None  # no NBD front end given
        assert call(tmp_path / "c.sock", "two.ping") == "two"
    finally:
        unit.stop()
    assert log == ["start one", "start two", "stop two", "stop one"]


def test_the_local_unit_does_not_reach_up_to_the_apps_or_the_cli() -> None:
    code = ("import sys, firmware.local, firmware.usb_gadget.service, firmware.ups.service\n"
            "print(sorted(m for m in sys.modules if m == 'firmware.cli' "
            "or m.startswith('firmware.apps')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
