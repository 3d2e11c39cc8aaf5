"""The console setup utility, driven as a real program in a pseudo-terminal (pexpect)
and read back through a vt100 emulator (pyte) at 80x24."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware import COPYRIGHT
from firmware.config import ConfigStore, StoreSettings, seal
from firmware.control import ControlServer
from tests.support.status import local_status, peer
from tests.support.terminal import DOWN, ENTER, ESC, UP, Term

PASSWORD = "correct horse battery"


class FakeUnit:
    """Stands in for the local unit's control socket and records the calls."""

    def __init__(self, path: Path) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.state = "ready"
        self.mode = "write-through"
        st = local_status(fill=0.123, peers={"remote": peer("connected")},
                          ups_flags="OL CHRG", charge=87.0)
        st["version"] = "0.1.0"
        st["volume"].update({"size": 64 << 20, "state": "ready"})
        st["cbq"].update({"queued_blocks": 42, "last_seq": 977})
        st["cbq"]["consumers"]["remote"].update(
            {"sent_seq": 970, "acked_seq": 935, "pending_records": 42})
        assert "link" in st and "ups" in st
        st["link"]["peers"]["remote"]["lag_seconds"] = 1.5
        st["ups"].update({"runtime": "unknown", "policy": {"state": "on-mains"}})
        self.status: Any = st

        def rec(op: str, result: Any) -> Any:
            def handler(**kw: Any) -> Any:
                self.calls.append((op, kw))
                return result(kw) if callable(result) else result
            return handler

        self.server = ControlServer(path, {
            "status": lambda: self.status,
            "cbq.pause": rec("cbq.pause", {}), "cbq.resume": rec("cbq.resume", {}),
            "volume.flush": rec("volume.flush", 0.25),
            "volume.set_state": rec("volume.set_state", lambda kw: kw["state"]),
            "volume.set_cache_mode": rec("volume.set_cache_mode", lambda kw: kw["mode"]),
        })


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    d: dict[str, Any] = {"tmp": tmp_path, "cfg": tmp_path / "config.slots",
                         "sock": tmp_path / "unit.sock", "terms": [],
                         "code": tmp_path / "boot" / "mirrorunit-erase-code.txt"}
    d["code"].parent.mkdir()

    def start(*extra: str) -> Term:
        t = Term(["--config", str(d["cfg"]), "--control", str(d["sock"]),
                  "--erase-code-file", str(d["code"]),
                  "--reboot-command", f"touch {tmp_path / 'rebooted'}",
                  "--poweroff-command", f"touch {tmp_path / 'powered-off'}",
                  "--log-file", str(tmp_path / "unit.log"), *extra], tmp_path)
        d["terms"].append(t)
        return t
    d["start"] = start
    yield d
    for t in d["terms"]:
        t.close()


def store(path: Path) -> ConfigStore:
    return ConfigStore(StoreSettings(str(path)))


def with_password(path: Path) -> ConfigStore:
    s = store(path)
    s.set_admin_password(PASSWORD)
    return s


def test_first_boot_forces_the_admin_password(env: dict[str, Any]) -> None:
    t = env["start"]()
    # A blank partition may be a replaced card: recovery is offered first.
    t.wait("recovery", "This unit has no configuration", "2  Set up as a new unit")
    assert not env["cfg"].exists()
    t.send("2")
    t.wait("set admin password", "First start: choose the admin password")
    t.send(ESC)  # cannot be skipped
    t.wait("An admin password is needed before anything else")
    t.line("short")
    t.wait("Repeat it:")
    t.line("short")
    t.wait("Refused: admin.password_hash: the password must have at least 10 characters")
    assert store(env["cfg"]).load().config is None  # nothing written
    t.line("password1234")
    t.wait("Repeat it:")
    t.line("password1234")
    t.wait("Refused: admin.password_hash: the password is too weak (score ")
    t.wait("This is a very common")
    assert store(env["cfg"]).load().config is None
    t.line(PASSWORD)
    t.line("something different")
    t.wait("The two entries differ")
    t.line(PASSWORD)
    t.line(PASSWORD)
    t.wait("main menu", "1  Status", " 0  Log", "Admin password saved")
    cfg = store(env["cfg"]).load().config
    assert cfg is not None and cfg["admin.password_hash"].startswith("$argon2id$")


def test_status_screen_not_running_then_running(env: dict[str, Any]) -> None:
    with_password(env["cfg"]).set_many({"unit.serial": "SN-0042", "unit.name": "lab-1"})
    t = env["start"]()
    t.wait("main menu")
    t.send("1")
    t.wait("*** LOCAL UNIT NOT RUNNING ***", "serial SN-0042", COPYRIGHT)
    unit = FakeUnit(env["sock"])
    unit.server.start()
    try:
        screen = t.wait("Role        local", timeout=20)
        assert "serial SN-0042" in screen and "version 0.1.0" in screen
        assert "Volume      64MB, ready, mode write-through" in screen
        assert "12.3% full, mode normal, 42 blocks in buffer" in screen
        assert "sent 970, acked by remote 935, lag 42 writes / 1.5 s" in screen
        assert "link      connected" in screen
        assert "UPS         OL CHRG, charge 87%" in screen
        assert f"{COPYRIGHT}  (Apache-2.0)" in screen
        assert "Copy        primary, generation -" in screen
        unit.status["link"]["split_brain"] = "split brain after seq 38: this copy holds 39..63"
        screen = t.wait("*** SPLIT BRAIN: split brain after seq 38", "give-up-here",
                        timeout=20)
        for line in t.screen.display:
            assert len(line) <= 80
        t.send(ESC)
        t.wait("main menu")
    finally:
        unit.server.stop()


def test_network_edit_refuses_in_place_and_saves_together(env: dict[str, Any]) -> None:
    with_password(env["cfg"])
    gen = store(env["cfg"]).load().generation
    t = env["start"]()
    t.wait("main menu")
    t.send("2")
    t.wait("network", "Address mode", "Choices: dhcp, static")
    t.send(ENTER)
    t.send("\x15")  # Ctrl-U: clear the field
    t.line("static")
    t.send(DOWN + ENTER)
    t.line("10.0.0.300")
    t.wait("Refused: network.address: '10.0.0.300' is not an IP address")
    t.send("\x7f\x7f\x7f" + "5" + ENTER)  # fix it in place
    t.wait("*Address")
    # Saving without a netmask is refused as a whole: nothing half-applied.
    t.send("s")
    t.wait("Admin password:")
    t.line(PASSWORD)
    t.wait("Refused, nothing saved: network.netmask: is required when network.mode is static")
    assert store(env["cfg"]).load().generation == gen
    t.send(DOWN + DOWN + ENTER)  # the form is still there with the draft
    t.line("255.255.255.0")
    t.send("s")  # unlocked now: no second password prompt
    t.wait("Saved (generation")
    t.wait("Needs restart: network.mode, network.address, network.netmask")
    cfg = store(env["cfg"]).load().config
    assert cfg is not None
    assert (cfg["network.mode"], cfg["network.address"], cfg["network.netmask"]) == \
        ("static", "10.0.0.5", "24")


def test_wrong_password_changes_nothing(env: dict[str, Any]) -> None:
    with_password(env["cfg"])
    t = env["start"]()
    t.wait("main menu")
    t.send("6")
    t.wait("notifications", "SNMP trap targets")
    t.send(ENTER)
    t.line("127.0.0.1 public; 10.0.0.9:1162 public2")
    t.wait("127.0.0.1:162 public; 10.0.0.9:1162 public2")
    t.send(ENTER + "\x15")
    t.line("nms")
    t.wait("Refused: notify.snmp[0]: write 'host[:port] community'")
    t.send(ESC)
    t.send("s")
    t.wait("Admin password:")
    t.line("not the password")
    t.wait("Wrong password: nothing changed")
    cfg = store(env["cfg"]).load().config
    assert cfg is not None and cfg["notify.snmp"] == []


def test_cache_mode_is_pushed_to_the_running_unit(env: dict[str, Any]) -> None:
    with_password(env["cfg"])
    unit = FakeUnit(env["sock"])
    unit.server.start()
    try:
        t = env["start"]()
        t.wait("main menu")
        t.send("5")
        t.wait("cache mode", "WARNING: no UPS is configured")
        t.send(ENTER + "\x15")
        t.line("write-sideways")
        t.wait("Refused: cache.mode: 'write-sideways' is not one of write-through, write-back")
        t.send("\x15")
        t.line("write-back")
        t.send("s")
        t.wait("Admin password:")
        t.line(PASSWORD)
        t.wait("Applied now: cache.mode")
        assert unit.calls == [("volume.set_cache_mode", {"mode": "write-back"})]
        cfg = store(env["cfg"]).load().config
        assert cfg is not None and cfg["cache.mode"] == "write-back"
    finally:
        unit.server.stop()


def test_actions_need_confirmation_and_password(env: dict[str, Any]) -> None:
    with_password(env["cfg"])
    unit = FakeUnit(env["sock"])
    unit.server.start()
    try:
        t = env["start"]()
        t.wait("main menu")
        t.send("8")
        t.wait("actions", "1  Pause the link", "7  Power off")
        t.send("1")
        t.wait("Really pause sending to the peers? [y/N]")
        t.send("n")
        t.wait("Cancelled.")
        assert unit.calls == []
        t.send("1")
        t.send("y")
        t.wait("Admin password:")
        t.line(PASSWORD)
        t.wait("Link paused.")
        t.send("2y")
        t.wait("Link resumed.")
        t.send("3y")
        t.wait("Cache flushed in 0.250 s.")
        t.send("4y")
        t.wait("Volume is standby.")
        t.send("5y")
        t.wait("Volume is ready.")
        assert unit.calls == [("cbq.pause", {"side": "dequeue"}),
                              ("cbq.resume", {"side": "dequeue"}), ("volume.flush", {}),
                              ("volume.set_state", {"state": "standby"}),
                              ("volume.set_state", {"state": "ready"})]
        t.send("6y")
        t.wait("Ran touch")
        assert (env["tmp"] / "rebooted").exists()
        assert not (env["tmp"] / "powered-off").exists()
        t.send("7y")
        t.wait("powered-off.")
        assert (env["tmp"] / "powered-off").exists()
    finally:
        unit.server.stop()


def test_peers_pairing_and_log(env: dict[str, Any]) -> None:
    with_password(env["cfg"])
    (env["tmp"] / "unit.log").write_text("".join(f"log line {i}\n" for i in range(100)))
    unit = FakeUnit(env["sock"])
    unit.server.start()
    try:
        t = env["start"]()
        t.wait("main menu")
        t.send("3")
        t.wait("This unit's certificate fingerprint", "AB:AB:AB", "No peers paired.")
        t.send("a")
        t.wait("Peer name")
        t.send(ENTER)
        t.line("remote-1")
        t.send(DOWN + ENTER)
        t.line("192.0.2.10:7443")
        t.send(DOWN + ENTER)
        t.line("12" * 31 + "zz")
        t.send("s")
        t.wait("Admin password:")
        t.line(PASSWORD)
        t.wait("Refused, nothing saved: peers[0].fingerprint: must be a SHA-256 fingerprint")
        assert store(env["cfg"]).load().config["peers"] == []  # type: ignore[index]
        t.send("a" + ENTER)
        t.line("remote-1")
        t.send(DOWN + ENTER)
        t.line("192.0.2.10:7443")
        t.send(DOWN + ENTER)
        t.line("12" * 32)
        t.send("s")
        t.wait("remote-1         192.0.2.10:7443", "12:12:12:12")
        peers = store(env["cfg"]).load().config["peers"]  # type: ignore[index]
        assert peers == [{"name": "remote-1", "address": "192.0.2.10:7443",
                          "fingerprint": "12" * 32}]
        # Chosen as keeper of this unit's sealed config: none is by default.
        assert store(env["cfg"]).load().config["backup.keepers"] == []  # type: ignore[index]
        t.send("k")
        t.wait("remote-1         192.0.2.10:7443  [keeps this unit's backup]")
        assert store(env["cfg"]).load().config["backup.keepers"] == \
            ["remote-1"]  # type: ignore[index]
        t.send("d")
        t.wait("Remove peer remote-1?")
        t.send("y")
        t.wait("No peers paired.")
        cfg = store(env["cfg"]).load().config
        assert cfg is not None and cfg["peers"] == [] and cfg["backup.keepers"] == []
        t.send(ESC)
        t.wait("main menu")
        t.send("0")  # unlocked already by the saves above
        t.wait("log line 99")
        assert "log line 50" not in t.text
        for _ in range(30):
            t.send(UP)
        t.wait("log line 50")
    finally:
        unit.server.stop()


def test_the_log_needs_the_admin_password(env: dict[str, Any]) -> None:
    with_password(env["cfg"])
    (env["tmp"] / "unit.log").write_text("peer 192.0.2.10 refused: secret detail\n")
    t = env["start"]()
    t.wait("main menu")
    t.send("0")
    t.wait("Admin password:")
    assert "secret detail" not in t.text
    t.line("not the password")
    t.wait("Wrong password: nothing changed", "main menu")
    assert "secret detail" not in t.text
    t.send("0")
    t.wait("Admin password:")
    t.line(PASSWORD)
    t.wait("log", "secret detail")


def test_unlocking_upgrades_an_old_scrypt_hash(env: dict[str, Any]) -> None:
    from firmware.config.kdf import ScryptParams, hash_password_text
    from firmware.config.schema import Config

    old = hash_password_text(PASSWORD, ScryptParams())
    store(env["cfg"]).save(Config.defaults().replace({"admin.password_hash": old}))
    (env["tmp"] / "unit.log").write_text("a line\n")
    t = env["start"]()
    t.wait("main menu")
    t.send("0")
    t.wait("Admin password:")
    t.line(PASSWORD)
    t.wait("a line")
    cfg = store(env["cfg"]).load().config
    assert cfg is not None and cfg["admin.password_hash"].startswith("$argon2id$v=19$")


def _code(path: Path) -> str:
    return next(line.split(": ", 1)[1] for line in path.read_text().splitlines()
                if line.startswith("code: "))


def test_a_corrupt_config_is_erased_only_with_the_code_from_the_card(
        env: dict[str, Any]) -> None:
    env["cfg"].write_bytes(b"\xde\xad" * 70000)  # a corrupt partition
    before = env["cfg"].read_bytes()
    t = env["start"]()
    t.wait("recovery", "cannot be read", "2  Start with a new configuration")
    t.send("2")
    t.wait("erase the configuration", "mirrorunit-erase-code.txt", "Erase code:")
    code = _code(env["code"])
    assert code not in t.text and code.replace("-", "") not in t.text
    t.send("y" + ENTER)  # what one y/N used to take
    t.wait("Wrong erase code: nothing erased", "recovery")
    assert env["cfg"].read_bytes() == before
    # The console is restarted (or the unit power-cycled to read the card): the code
    # in the file still holds.
    t.close()
    t = env["start"]()
    t.wait("recovery", "cannot be read")
    t.send("2")
    t.wait("Erase code:")
    assert _code(env["code"]) == code
    t.line(code.lower())
    t.wait("set admin password", "First start: choose the admin password")
    assert not env["code"].exists()  # used up
    loaded = store(env["cfg"]).load()
    assert loaded.config is not None and not loaded.config["admin.password_hash"]


def test_recovery_from_a_peer_backup(env: dict[str, Any]) -> None:
    original = with_password(env["tmp"] / "original.slots")
    original.set_many({"unit.name": "lab-7", "unit.serial": "SN-7"})
    cfg = original.load().config
    assert cfg is not None
    blob = env["tmp"] / "peer-copy.sealed"
    blob.write_bytes(seal(cfg, PASSWORD))
    env["cfg"].write_bytes(b"\xde\xad" * 70000)  # a corrupt partition
    t = env["start"]("--backup-file", str(blob))
    t.wait("recovery", "cannot be read", "1  Recover it from a peer")
    t.send("1")
    t.wait("recovery: network", "Peer address host:port")
    for _ in range(5):
        t.send(DOWN)
    t.send(ENTER)
    t.line("192.0.2.10:7443")
    t.send(DOWN + ENTER)
    t.line("cd" * 32)
    t.send("s")
    t.wait("Admin password of this unit:")
    t.line("wrong password")
    t.wait("Recovery refused: the admin password does not open this backup")
    t.send("1")
    t.wait("recovery: network")
    t.send("s")
    t.wait("Refused: peers[0].address")
    t.send("1")
    for _ in range(5):
        t.send(DOWN)
    t.send(ENTER)
    t.line("192.0.2.10:7443")
    t.send(DOWN + ENTER)
    t.line("cd" * 32)
    t.send("s")
    t.wait("Admin password of this unit:")
    t.line(PASSWORD)
    t.wait("main menu", "Configuration recovered from the peer")
    restored = store(env["cfg"]).load().config
    assert restored == cfg


@pytest.fixture()
def netfake(tmp_path: Path, fake_networkctl: tuple[Path, Path]) -> dict[str, Path]:
    """Where the console writes the networkd file, and a networkctl that logs its
    arguments (and fails while FAIL exists)."""
    net = tmp_path / "sys-class-net"
    for name in ("lo", "eth0", "wlan0"):
        (net / name).mkdir(parents=True)
    script, log = fake_networkctl
    return {"file": tmp_path / "run/10-mirrorunit.network", "log": log, "script": script,
            "net": net, "fail": tmp_path / "FAIL"}


def net_args(n: dict[str, Path]) -> list[str]:
    return ["--apply-network", "--network-file", str(n["file"]), "--networkctl",
            str(n["script"]), "--sys-class-net", str(n["net"])]


def test_network_screen_applies_the_saved_settings(env: dict[str, Any],
                                                   netfake: dict[str, Path]) -> None:
    with_password(env["cfg"])
    t = env["start"](*net_args(netfake))
    t.wait("main menu")
    t.send("2")
    t.wait("network", "Address mode")
    t.send(ENTER + "\x15")
    t.line("static")
    t.send(DOWN + ENTER)
    t.line("192.0.2.5")
    t.send(DOWN + ENTER)
    t.line("24")
    t.send(DOWN + ENTER)
    t.line("192.0.2.1")
    t.send("s")
    t.wait("Admin password:")
    t.line(PASSWORD)
    t.wait("Applied now: network.mode, network.address, network.netmask, network.gateway")
    assert netfake["log"].read_text().splitlines() == ["reload", "reconfigure eth0"]
    text = netfake["file"].read_text()
    assert "Address=192.0.2.5/24" in text and "Gateway=192.0.2.1" in text
    # networkctl fails: the change is saved all the same and the failure is on screen.
    netfake["fail"].write_text("")
    t.send("2")
    t.wait("network", "Address mode")
    for _ in range(4):
        t.send(DOWN)
    t.send(ENTER)
    t.line("192.0.2.53")
    t.send("s")
    t.wait("FAILED network.dns:", "Connection timed out")
    cfg = store(env["cfg"]).load().config
    assert cfg is not None and cfg["network.dns"] == ["192.0.2.53"]
    assert "DNS=192.0.2.53" in netfake["file"].read_text()


def test_recovery_applies_the_typed_network_before_asking_the_peer(
        env: dict[str, Any], netfake: dict[str, Path]) -> None:
    original = with_password(env["tmp"] / "original.slots")
    cfg = original.load().config
    assert cfg is not None
    blob = env["tmp"] / "peer-copy.sealed"
    blob.write_bytes(seal(cfg, PASSWORD))
    t = env["start"]("--backup-file", str(blob), *net_args(netfake))
    t.wait("recovery", "This unit has no configuration")
    t.send("1")
    t.wait("recovery: network", "Peer address host:port")
    t.send(ENTER + "\x15")
    t.line("static")
    t.send(DOWN + ENTER)
    t.line("198.51.100.20")
    t.send(DOWN + ENTER)
    t.line("255.255.255.0")
    t.send(DOWN + DOWN + DOWN + ENTER)
    t.line("198.51.100.1:7310")
    t.send(DOWN + ENTER)
    t.line("cd" * 32)
    t.send("s")
    # The peer is only asked (here: the file stands in for it) once the network is up.
    t.wait("Admin password of this unit:")
    assert "Address=198.51.100.20/24" in netfake["file"].read_text()
    assert netfake["log"].read_text().splitlines() == ["reload", "reconfigure eth0"]
    assert store(env["cfg"]).load().config is None  # nothing saved before the recovery
    t.send(ESC)
    # A failing networkctl stops the recovery before the peer is contacted.
    netfake["fail"].write_text("")
    t.send("1")
    t.wait("recovery: network")
    for _ in range(5):
        t.send(DOWN)
    t.send(ENTER)
    t.line("198.51.100.1:7310")
    t.send(DOWN + ENTER)
    t.line("cd" * 32)
    t.send("s")
    t.wait("Cannot apply the network settings:", "Connection timed out")
    assert "Admin password of this unit" not in t.text


def test_ssh_is_off_until_enabled_with_a_key(env: dict[str, Any]) -> None:
    import subprocess

    with_password(env["cfg"])
    key = env["tmp"] / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops@desk", "-f",
                    str(key)], check=True)
    pub = key.with_name("id_ed25519.pub").read_text().strip()
    ssh_dir = env["tmp"] / "part"
    ssh_dir.mkdir()
    t = env["start"]("--ssh-dir", str(ssh_dir), "--no-ssh-service")
    t.wait("main menu", " 9  SSH access", " 0  Log")
    t.send("9")
    t.wait("SSH is OFF", "Host key  none yet")
    t.send("e")
    t.wait("Admin password:")
    t.line(PASSWORD)
    t.wait("Paste one public key")
    t.line("ssh-ed25519 not-a-key")
    t.wait("Refused: line 1: the ssh-ed25519 key data is damaged. Nothing changed.")
    assert not (ssh_dir / "ssh").exists()
    t.send("e")
    t.wait("Paste one public key")
    t.line(pub)
    t.wait("SSH on. Host key SHA256:")
    assert (ssh_dir / "ssh" / "enabled").exists()
    assert (ssh_dir / "ssh" / "authorized_keys").read_text().split()[:2] == pub.split()[:2]
    t.wait("SSH is ON, 1 authorized key(s)")
    t.send("d")
    t.wait("Really turn SSH off? [y/N]")
    t.send("y")
    t.wait("SSH off.", "SSH is OFF")
    assert not (ssh_dir / "ssh" / "enabled").exists()

