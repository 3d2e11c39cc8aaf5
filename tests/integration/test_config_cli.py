"""`mirrorunit config` commands, live application over the control socket, remount hook,
peer backup blobs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from firmware.cli import main
from firmware.config import ConfigStore, ConfigStoreError, StoreSettings, StoreState, WrongPassword
from firmware.config.backup import backup_blob, file_source, restore_blob
from firmware.config.live import apply_live
from firmware.config.mount import RemountHook, mount_of, parse_mountinfo
from firmware.config.schema import Config, diff_live
from firmware.control import ControlServer
from tests.support import REPO as ROOT

PASSWORD = "correct horse battery"


@pytest.fixture()
def cfgpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.slots"
    monkeypatch.setenv("MIRRORUNIT_CONFIG", str(path))
    return path


def stored(path: Path) -> Config:
    cfg = ConfigStore(StoreSettings(str(path))).load().config
    assert cfg is not None
    return cfg


def run(argv: list[str], capsys: pytest.CaptureFixture[str], stdin: str | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_set_show_and_refusal(cfgpath: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["config", "set", "unit.name", "lab-1"], capsys)
    assert rc == 0 and "saved generation 1" in out
    rc, out, _ = run(["config", "show"], capsys)
    assert rc == 0 and "generation 1 from slot 0" in out
    assert any(line.split() == ["unit.name", "lab-1"] for line in out.splitlines())
    before = cfgpath.read_bytes()
    rc, _, err = run(["config", "set", "buffer.high_water", "0.99"], capsys)
    assert rc == 1 and "buffer.high_water" in err and "outside" in err
    assert cfgpath.read_bytes() == before  # nothing written
    rc, out, _ = run(["config", "show", "--json"], capsys)
    doc = json.loads(out)
    assert doc["generation"] == 1 and doc["config"]["buffer.high_water"] == "0.8"
    rc, out, _ = run(["config", "set", "unit.name", "lab-1"], capsys)
    assert rc == 0 and "no change" in out


def test_export_import_round_trip(cfgpath: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["config", "set", "cache.mode", "write-back"], capsys)[0] == 0
    out_file = tmp_path / "c.cbor"
    assert run(["config", "export", "--format", "cbor", "-o", str(out_file)], capsys)[0] == 0
    rc, out, _ = run(["config", "export"], capsys)
    doc = json.loads(out)
    assert doc["cache.mode"] == "write-back" and "admin.password_hash" not in doc
    other = tmp_path / "other.slots"
    rc, out, _ = run(["config", "import", "--config", str(other), str(out_file)], capsys)
    assert rc == 0 and "cache.mode" in out
    assert stored(other)["cache.mode"] == "write-back"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1, "unit.name": "ok-name",
                               "scsi.lun": 9}))
    rc, _, err = run(["config", "import", "--config", str(other), str(bad)], capsys)
    assert rc == 1 and "nothing written" in err and "scsi.lun" in err
    assert stored(other)["unit.name"] == "mirrorunit"


def test_passwd_and_backup_restore(cfgpath: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rc, _, err = run(["config", "passwd", "--stdin"], capsys, "short\nshort\n", monkeypatch)
    assert rc == 1 and "at least 10 characters" in err
    # Long enough but weak: refused with zxcvbn's reason, nothing written.
    rc, _, err = run(["config", "passwd", "--stdin"], capsys, "password1234\npassword1234\n",
                     monkeypatch)
    assert rc == 1 and "too weak (score " in err and "3 needed" in err
    assert "This is a very common password" in err and "password1234" not in err
    assert not cfgpath.exists()
    rc, _, err = run(["config", "passwd", "--stdin"], capsys,
                     f"{PASSWORD}\nsomething else 1\n", monkeypatch)
    assert rc == 1 and "differ" in err
    rc, out, _ = run(["config", "passwd", "--stdin"], capsys, f"{PASSWORD}\n{PASSWORD}\n",
                     monkeypatch)
    assert rc == 0 and "saved" in out
    # Changing it needs the current one.
    rc, _, err = run(["config", "passwd", "--stdin"], capsys,
                     "not the password\nnew password 123\nnew password 123\n", monkeypatch)
    assert rc == 1 and "wrong password" in err
    rc, out, _ = run(["config", "show"], capsys)
    assert "admin.password_hash" in out and "$scrypt$" not in out
    blob = tmp_path / "unit.sealed"
    rc, _, err = run(["config", "backup", "--stdin", str(blob)], capsys, "wrong one!!\n",
                     monkeypatch)
    assert rc == 1 and not blob.exists()
    rc, _, _ = run(["config", "backup", "--stdin", str(blob)], capsys, PASSWORD + "\n",
                   monkeypatch)
    assert rc == 0 and blob.stat().st_size > 76
    assert PASSWORD.encode() not in blob.read_bytes()
    # A valid config is not overwritten without --force.
    rc, _, err = run(["config", "restore", "--stdin", str(blob)], capsys, PASSWORD + "\n",
                     monkeypatch)
    assert rc == 1 and "valid config" in err
    fresh = tmp_path / "fresh.slots"
    rc, _, err = run(["config", "restore", "--config", str(fresh), "--stdin", str(blob)],
                     capsys, "bad password!\n", monkeypatch)
    assert rc == 1 and "does not open" in err and not fresh.exists()
    rc, out, _ = run(["config", "restore", "--config", str(fresh), "--stdin", str(blob)],
                     capsys, PASSWORD + "\n", monkeypatch)
    assert rc == 0 and "restored" in out
    assert ConfigStore(StoreSettings(str(fresh))).load().config == \
        ConfigStore(StoreSettings(str(cfgpath))).load().config


def test_backup_helpers(tmp_path: Path) -> None:
    store = ConfigStore(StoreSettings(str(tmp_path / "a")))
    store.set_admin_password(PASSWORD)
    with pytest.raises(WrongPassword):
        backup_blob(store, "not it at all")
    blob = backup_blob(store, PASSWORD)
    (tmp_path / "blob").write_bytes(blob)
    target = ConfigStore(StoreSettings(str(tmp_path / "b")))
    (tmp_path / "b").write_bytes(b"\xff" * 4096)  # corrupt partition
    assert target.load().state is StoreState.CORRUPT
    restored = restore_blob(target, file_source(tmp_path / "blob")(Config.defaults()), PASSWORD)
    assert restored.config == store.load().config
    with pytest.raises(ConfigStoreError):
        restore_blob(target, blob, PASSWORD)


class FakeUnit:
    """A control server standing in for the local unit, recording the calls it gets."""

    def __init__(self, path: Path, ops: tuple[str, ...]) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        handlers = {op: self._recorder(op) for op in ops}
        self.server = ControlServer(path, handlers)

    def _recorder(self, op: str) -> Any:
        def handler(**kw: Any) -> Any:
            self.calls.append((op, kw))
            return kw.get("mode", "ok")
        return handler


def test_live_changes_are_pushed_and_restarts_named(
        cfgpath: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "unit.sock"
    unit = FakeUnit(sock, ("status", "volume.set_cache_mode"))
    unit.server.start()
    try:
        rc, out, _ = run(["config", "set", "--control", str(sock), "cache.mode",
                          "write-back"], capsys)
        assert rc == 0
        assert unit.calls == [("volume.set_cache_mode", {"mode": "write-back"})]
        assert "applied   cache.mode: local unit now write-back" in out
        rc, out, _ = run(["config", "set", "--control", str(sock), "buffer.high_water",
                          "0.7"], capsys)
        assert "restart   buffer.high_water: the running unit has no cbq.set_high_water" in out
        rc, out, _ = run(["config", "set", "--control", str(sock), "scsi.lun", "2"], capsys)
        assert "restart   scsi.lun" in out
        rc, out, _ = run(["config", "set", "--control", str(sock), "notify.poll_interval_s",
                          "5"], capsys)
        assert "applied   notify.poll_interval_s: the notify process" in out
    finally:
        unit.server.stop()
    # With no unit running the change is stored and said to wait for a start.
    old = Config.defaults()
    new = old.replace({"cache.mode": "write-back"})
    report = apply_live(diff_live(old, new), new, str(sock))
    assert report.restart == [("cache.mode", "stored; no local unit is running")]


MOUNTINFO = """\
22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw
30 22 8:1 / /config ro,relatime shared:2 - vfat /dev/sda1 ro
31 22 8:3 / /data rw,relatime shared:3 - ext4 /dev/sda3 rw
32 22 8:4 / /with\\040space ro shared:4 - ext4 /dev/sda4 ro
"""


@pytest.mark.parametrize("path,mount_point,read_only", [
    ("/config/config.slots", "/config", True),
    ("/data/x/config.slots", "/data", False),
    ("/etc/mirrorunit/config.slots", "/", False),
    ("/configuration/x", "/", False),
    ("/with space/c", "/with space", True),
])
def test_mount_of(path: str, mount_point: str, read_only: bool) -> None:
    entry = mount_of(path, parse_mountinfo(MOUNTINFO))
    assert entry is not None
    assert (entry.mount_point, entry.read_only) == (mount_point, read_only)


def test_remount_hook_only_for_a_separate_read_only_mount(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    calls: list[list[str]] = []

    def runner(argv: Sequence[str]) -> None:
        calls.append(list(argv))

    hook = RemountHook("/config/config.slots", str(info), runner)
    hook(True)
    hook(False)
    assert calls == [["mount", "-o", "remount,rw", "/config"],
                     ["mount", "-o", "remount,ro", "/config"]]
    calls.clear()
    for path in ("/etc/mirrorunit/config.slots", "/data/config.slots"):
        other = RemountHook(path, str(info), runner)
        other(True)
        other(False)
    assert calls == []


def test_remount_failure_writes_nothing(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(f"30 22 8:1 / {tmp_path} ro,relatime - ext4 /dev/x ro\n")

    def runner(argv: Sequence[str]) -> None:
        raise subprocess.CalledProcessError(32, list(argv), "", "mount: permission denied")

    path = tmp_path / "c.slots"
    store = ConfigStore(StoreSettings(str(path)), remount=RemountHook(str(path), str(info),
                                                                       runner))
    with pytest.raises(ConfigStoreError, match="permission denied"):
        store.set("unit.name", "x-1")
    assert not path.exists()


def test_cli_in_a_subprocess(tmp_path: Path) -> None:
    env = {"MIRRORUNIT_CONFIG": str(tmp_path / "c.slots"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "firmware", "config", "set", "ups.model",
                        "gpio"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "ups.gpio_pin: is required when ups.model is gpio" in r.stderr
    r = subprocess.run([sys.executable, "-m", "firmware", "config", "export"], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["ups.model"] == "none"
