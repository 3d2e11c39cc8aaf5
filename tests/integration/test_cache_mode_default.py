"""One durable default: every entry point runs write-through unless told otherwise, and the
unit says at start (and in status) which cache mode it runs in and whether a UPS backs it."""

from __future__ import annotations

from pathlib import Path

from firmware import COPYRIGHT, LICENSE, demo
from firmware.apps import local
from firmware.cli import build_parser
from firmware.config.schema import Config
from firmware.local import LocalSettings
from tests.support import REPO
from tests.support.unitproc import LocalProc


def test_every_entry_point_defaults_to_write_through(tmp_path: Path) -> None:
    cli = local.settings_from_args(build_parser().parse_args(
        ["local", "--disk", "d", "--buffer", "b"]))
    assert cli.unit.cache_mode.value == "write-through"
    assert LocalSettings(Path("d"), Path("b"), Path("c")).cache_mode.value == "write-through"
    cfg = Config.defaults()
    assert cfg["cache.mode"] == "write-through"
    appliance = local.settings_from_config(
        cfg, disk="/dev/data", buffer="/dev/buf", store_path="/config/c.slots",
        state_dir=tmp_path, control="/run/local.sock", peers=[])
    assert appliance.unit.cache_mode.value == "write-through"
    argv = demo.local_command(tmp_path / "c.sock", tmp_path / "st")
    assert argv[argv.index("--cache-mode") + 1] == "write-through"
    # the README states it
    assert "write-through by default" in (REPO / "README.md").read_text()


def test_the_unit_says_its_cache_mode_and_ups_at_start_and_in_status(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with LocalProc(tmp_path / "a") as unit:
        st = unit.call("status")
        assert st["power"] == {"cache_mode": "write-through", "ups": None}
        assert st["volume"]["cache_mode"] == "write-through"
        assert st["copyright"] == COPYRIGHT and st["license"] == LICENSE
    assert "cache mode write-through" in unit.log.read_text()
    assert "UPS: none" in unit.log.read_text()

    (tmp_path / "b").mkdir()
    with LocalProc(tmp_path / "b", extra=("--cache-mode", "write-back")) as unit:
        assert unit.call("status")["power"] == {"cache_mode": "write-back", "ups": None}
    assert "cache mode write-back with no UPS" in unit.log.read_text()

    (tmp_path / "c").mkdir()
    with LocalProc(tmp_path / "c", extra=("--cache-mode", "write-back",
                                          "--ups-external", "ina219")) as unit:
        ups = unit.call("status")["power"]["ups"]
        assert ups is not None and "ina219" in ups
    assert "cache mode write-back, backed by ina219 UPS" in unit.log.read_text()
