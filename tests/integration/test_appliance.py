"""`mirrorunit appliance`: the card image's services run each role from the unit's config."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firmware.apps import appliance
from firmware.apps import remote as remote_app
from firmware.apps.appliance import ApplianceError, Storage
from firmware.apps.appliance.prepare import _signature
from firmware.cli import build_parser
from firmware.config.store import open_store
from firmware.link.tls import CERT_FILE, KEY_FILE, PEERS_FILE, PeerStore, fingerprint, unit_identity
from tests.support import REPO
from tests.support.replication import RemoteProc


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware", *argv], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


@pytest.fixture
def unit(tmp_path: Path) -> dict[str, Any]:
    """A config partition as first boot leaves it: slots, identity, storage map."""
    part = tmp_path / "config"
    part.mkdir()
    slots = part / "config.slots"
    unit_identity(part / "link", "mirrorunit-0000abcd")
    env = part / "storage.env"
    env.write_text("# written by first boot\nMIRRORUNIT_BUFFER=/dev/disk/by-partuuid/x-06\n"
                   "MIRRORUNIT_DATA=/dev/disk/by-partuuid/x-07\nMIRRORUNIT_STORAGE=sd:mmcblk0\n")
    run = tmp_path / "run"
    return {"slots": slots, "env": env, "run": run, "part": part}


def _dry_run(unit: dict[str, Any], role: str = "local") -> list[str]:
    r = _cli("appliance", role, "--config", str(unit["slots"]), "--storage-env",
             str(unit["env"]), "--run-dir", str(unit["run"]), "--dry-run")
    assert r.returncode == 0, r.stderr
    import shlex
    return shlex.split(r.stdout)


def _opt(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


# ------------------------------------------------------------------ storage map


def test_storage_map_is_read(unit: dict[str, Any]) -> None:
    s = appliance.read_storage_env(unit["env"])
    assert s == Storage("/dev/disk/by-partuuid/x-06", "/dev/disk/by-partuuid/x-07", "sd:mmcblk0")


def test_storage_map_of_an_external_disk_names_its_partitions(tmp_path: Path) -> None:
    (tmp_path / "storage.env").write_text(
        "MIRRORUNIT_BUFFER=/dev/disk/by-partuuid/b1\nMIRRORUNIT_DATA=/dev/disk/by-partuuid/d1\n"
        "MIRRORUNIT_BUFFER_ID=partuuid:b1\nMIRRORUNIT_DATA_ID=partuuid:d1\n"
        "MIRRORUNIT_STORAGE=external:/dev/nvme0n1\n")
    s = appliance.read_storage_env(tmp_path / "storage.env")
    assert (s.buffer_id, s.data_id) == ("partuuid:b1", "partuuid:d1")


@pytest.mark.parametrize("text, words", [
    ("MIRRORUNIT_BUFFER=/dev/a\n", "MIRRORUNIT_DATA not set"),
    ("MIRRORUNIT_BUFFER=/dev/a\ngarbage\n", "line 2: not KEY=value"),
    ("", "MIRRORUNIT_BUFFER, MIRRORUNIT_DATA not set"),
])
def test_broken_storage_map_names_the_problem(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "storage.env").write_text(text)
    with pytest.raises(ApplianceError, match=words):
        appliance.read_storage_env(tmp_path / "storage.env")
    with pytest.raises(ApplianceError, match="has first boot run"):
        appliance.read_storage_env(tmp_path / "absent.env")


# ------------------------------------------------------------------ role


def test_role_comes_from_the_config(unit: dict[str, Any]) -> None:
    slots = str(unit["slots"])
    # never configured: a local unit
    assert _cli("appliance", "role-is", "--config", slots, "local").returncode == 0
    r = _cli("appliance", "role-is", "--config", slots, "remote")
    assert r.returncode == 1 and "role is 'local', not 'remote'" in r.stderr
    open_store(slots).set("role", "remote")
    assert _cli("appliance", "role-is", "--config", slots, "remote").returncode == 0
    assert _cli("appliance", "role-is", "--config", slots, "local").returncode == 1
    # the role's own command refuses the other role clearly (exit 2: no restart loop)
    r = _cli("appliance", "local", "--config", slots, "--storage-env", str(unit["env"]),
             "--run-dir", str(unit["run"]), "--dry-run")
    assert r.returncode == 2 and "role is 'remote', not 'local'" in r.stderr


def test_corrupt_config_still_serves_the_disk_with_defaults(unit: dict[str, Any]) -> None:
    unit["slots"].write_bytes(b"\xff" * 4096)
    argv = _dry_run(unit)
    assert _opt(argv, "--cache-mode") == ["write-through"] and "--remote" not in argv


# ------------------------------------------------------------------ local role


def test_local_options_follow_the_config(unit: dict[str, Any]) -> None:
    store = open_store(str(unit["slots"]))
    store.set_many({"cache.mode": "write-back", "buffer.high_water": "0.7",
                    "scsi.vendor": "ACME", "scsi.product": "Vault 9", "unit.serial": "SN42",
                    "ups.model": "ina219"})
    argv = _dry_run(unit)
    build_parser().parse_args(argv)  # every option exists in `mirrorunit local`
    assert argv[0] == "local"
    assert _opt(argv, "--disk") == ["/dev/disk/by-partuuid/x-07"]
    assert _opt(argv, "--buffer") == ["/dev/disk/by-partuuid/x-06"]
    assert _opt(argv, "--frontend") == ["usb"] and _opt(argv, "--nbd") == [""]
    assert _opt(argv, "--cache-mode") == ["write-back"]
    assert _opt(argv, "--high-water") == ["0.7"]
    assert _opt(argv, "--scsi-vendor") == ["ACME"] and _opt(argv, "--scsi-product") == ["Vault 9"]
    assert _opt(argv, "--usb-serial") == ["SN42"]
    assert "--ups-config" not in argv  # the UPS monitor is its own service: not twice
    assert _opt(argv, "--config") == [str(unit["slots"])]
    # the identity stays on the config partition; the unit works in a writable copy
    work = Path(_opt(argv, "--state-dir")[0])
    assert work == unit["run"] / "local-link"
    for name in (KEY_FILE, CERT_FILE):
        assert (work / name).is_symlink()
        assert (work / name).resolve() == (unit["part"] / "link" / name).resolve()


def test_missing_identity_is_a_clear_error(unit: dict[str, Any]) -> None:
    shutil.rmtree(unit["part"] / "link")
    r = _cli("appliance", "local", "--config", str(unit["slots"]), "--storage-env",
             str(unit["env"]), "--run-dir", str(unit["run"]), "--dry-run")
    assert r.returncode == 2 and "no link identity" in r.stderr


# ------------------------------------------------------------------ pinning from the config


@pytest.fixture
def remote(tmp_path: Path) -> Any:
    (tmp_path / "remote").mkdir()
    r = RemoteProc(tmp_path / "remote")
    unit_identity(r.state_dir, "remote-a")
    r.start()
    yield r
    r.stop()


def _fp(remote: RemoteProc) -> str:
    ident, _ = unit_identity(remote.state_dir)
    return fingerprint(ident.cert_der)


def test_configured_peer_is_fetched_pinned_and_kept(unit: dict[str, Any], remote: RemoteProc,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(str(unit["slots"]))
    good = {"name": "vault", "address": f"127.0.0.1:{remote.port}", "fingerprint": _fp(remote)}
    wrong = {"name": "impostor", "address": f"127.0.0.1:{remote.port}",
             "fingerprint": "ab" * 32}
    store.update({"peers": [good, wrong]})
    argv = _dry_run(unit)
    # only the peer whose certificate matches the typed fingerprint gets a link
    assert _opt(argv, "--remote") == [f"vault=127.0.0.1:{remote.port}"]
    persistent = PeerStore.in_dir(unit["part"] / "link")
    pinned = persistent.get("vault")
    assert pinned is not None and pinned.fingerprint == _fp(remote)
    assert persistent.get("impostor") is None
    # the next start needs no peer: the pin was saved beside the identity
    remote.stop()
    shutil.rmtree(unit["run"])
    assert _opt(_dry_run(unit), "--remote") == [f"vault=127.0.0.1:{remote.port}"]


def test_pinning_logs_wrong_and_unreachable_peers(unit: dict[str, Any], remote: RemoteProc,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg = open_store(str(unit["slots"])).update({"peers": [
        {"name": "impostor", "address": f"127.0.0.1:{remote.port}", "fingerprint": "cd" * 32},
        {"name": "gone", "address": "127.0.0.1:1", "fingerprint": _fp(remote)},
    ]})
    del cfg
    config = appliance.load_config(str(unit["slots"]))
    work = appliance.working_state_dir(unit["part"] / "link", unit["run"] / "w")
    remounts: list[bool] = []
    with caplog.at_level(logging.INFO, logger="mirrorunit.appliance"):
        ready = appliance.pin_configured_peers(config, work, unit["part"] / "link",
                                               remount=remounts.append)
    assert ready == []
    assert "not the configured " + "cd" * 32 in caplog.text
    assert "gone: cannot fetch its certificate from 127.0.0.1:1" in caplog.text
    assert remounts == []  # nothing pinned, the config partition was not touched
    assert not (unit["part"] / "link" / PEERS_FILE).exists()


# ------------------------------------------------------------------ remote role


def test_remote_store_on_a_blank_partition_is_formatted_once(tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None or shutil.which("blkid") is None:
        pytest.skip("e2fsprogs / util-linux missing")
    dev = tmp_path / "data.img"
    with dev.open("wb") as f:
        f.truncate(64 << 20)
    mounts: list[list[str]] = []

    def runner(argv: Any) -> None:
        if argv[0] == "mount":
            mounts.append(list(argv))  # mounting needs a real block device; recorded only
        else:
            subprocess.run(list(argv), check=True, capture_output=True)

    where = appliance.mount_store(str(dev), tmp_path / "store", runner=runner)
    assert where == tmp_path / "store" and mounts[0][:4] == ["mount", "-t", "ext4", "-o"]
    assert _signature(str(dev)) == "ext4"
    before = dev.read_bytes()[:1 << 20]
    appliance.mount_store(str(dev), tmp_path / "store", runner=runner)
    assert dev.read_bytes()[:1 << 20] == before  # an ext4 store is never formatted again


def test_remote_refuses_a_partition_holding_something_else(tmp_path: Path) -> None:
    if shutil.which("blkid") is None:
        pytest.skip("util-linux missing")
    dev = tmp_path / "data.img"
    with dev.open("wb") as f:
        f.truncate(16 << 20)
        f.seek(8192)
        f.write(b"a local unit's mirror block")
    calls: list[list[str]] = []
    with pytest.raises(ApplianceError, match="holds data but no filesystem"):
        appliance.mount_store(str(dev), tmp_path / "store", runner=lambda a: calls.append(list(a)))
    assert calls == []
    assert b"a local unit's mirror block" in dev.read_bytes()


def test_remote_options(unit: dict[str, Any], tmp_path: Path) -> None:
    argv = remote_app.command_line(remote_app.settings_from_config(
        appliance.load_config(str(unit["slots"])), store_path=str(unit["slots"]),
        state_dir=tmp_path / "w", store_dir=tmp_path / "store", control="/run/x/remote.sock"))
    build_parser().parse_args(argv)
    assert _opt(argv, "--listen") == [f"0.0.0.0:{appliance.DEFAULT_LINK_PORT}"]
    assert _opt(argv, "--store") == [str(tmp_path / "store")]
    assert _opt(argv, "--control") == ["/run/x/remote.sock"]


def test_pins_the_running_unit_adds_are_saved_on_the_config_partition(
        unit: dict[str, Any], tmp_path: Path) -> None:
    persistent = unit["part"] / "link"
    work = appliance.working_state_dir(persistent, unit["run"] / "remote-link")
    remounts: list[bool] = []
    keeper = appliance.PinKeeper(work, persistent, remounts.append)
    assert not keeper.poll() and remounts == []
    other, name = unit_identity(tmp_path / "a-local", "mirrorunit-00001111")
    PeerStore.in_dir(work).pin(name, other.cert_der)  # what a PAIR_OFFER does at run time
    assert keeper.poll()
    assert remounts == [True, False]
    saved = PeerStore.in_dir(persistent).get(name)
    assert saved is not None and saved.cert_der == other.cert_der
    assert not keeper.poll() and remounts == [True, False]  # unchanged: not written again

