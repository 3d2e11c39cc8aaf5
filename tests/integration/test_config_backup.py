"""Peer config backup over the journey link: CONFIG_PUT / CONFIG_GET / CONFIG_BLOB
frames, the receiver's rules, sealing and restoring, and `mirrorunit config
recover --from-peer` against real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest

from firmware.config import ConfigStore, StoreSettings, StoreState, WrongPassword
from firmware.config.errors import ConfigStoreError, SealTampered
from firmware.config.peer_backup import (
    OWN_BACKUP_NAME,
    peer_backup_name,
    read_blob,
    restore_config,
    seal_config,
    write_blob,
)
from firmware.link.errors import LinkProtocolError
from firmware.link.frames import (
    MAX_CONFIG_BLOB,
    PROTOCOL_VERSION,
    ConfigBlob,
    ConfigGet,
    ConfigPut,
    ErrorFrame,
    FrameDecoder,
    Hello,
    encode_body,
    encode_frame,
)
from firmware.link.session import ReceiverConfig, ReceiverSession
from firmware.remote.server import CONFIG_BACKUP_NAME
from tests.support import REPO as ROOT
from tests.support.replication import MakePair, wait_for

#: the link protocol versions a HELLO of this firmware offers
VERSIONS = (PROTOCOL_VERSION,)

PASSWORD = "correct horse battery"


# --------------------------------------------------------------------------- frames


@pytest.mark.parametrize("frame", [
    ConfigPut("unit-a", b"\x01" * 100),
    ConfigPut("unit-a", b"\x02" * MAX_CONFIG_BLOB),
    ConfigGet("unit-a"),
    ConfigBlob("unit-a", b"sealed"),
    ConfigBlob("unit-a", None),
])
def test_config_frames_round_trip(frame: Any) -> None:
    wire = encode_frame(frame)
    assert FrameDecoder().receive_data(wire) == [frame]
    dec = FrameDecoder()
    assert [f for i in range(0, len(wire), 7) for f in dec.receive_data(wire[i:i + 7])] \
        == [frame]


@pytest.mark.parametrize("body,reason", [
    ({"type": "CONFIG_PUT", "unit": "u", "blob": b"x" * (MAX_CONFIG_BLOB + 1)}, "outside 1.."),
    ({"type": "CONFIG_PUT", "unit": "u", "blob": b""}, "outside 1.."),
    ({"type": "CONFIG_PUT", "unit": "", "blob": b"x"}, "must not be empty"),
    ({"type": "CONFIG_PUT", "unit": "u"}, "lacks field 'blob'"),
    ({"type": "CONFIG_GET", "unit": 5}, "must be text"),
    ({"type": "CONFIG_BLOB", "unit": "u", "blob": "text"}, "byte string"),
    ({"type": "CONFIG_BLOB", "unit": "u", "blob": b"x" * (MAX_CONFIG_BLOB + 1)}, "outside"),
])
def test_malformed_config_frames_are_refused(body: dict[str, Any], reason: str) -> None:
    with pytest.raises(LinkProtocolError, match=reason):
        FrameDecoder().receive_data(encode_body(cbor2.dumps(body)))


def test_an_oversized_blob_is_not_sent() -> None:
    with pytest.raises(LinkProtocolError, match="limit"):
        encode_frame(ConfigPut("unit-a", b"x" * (MAX_CONFIG_BLOB + 1)))


class Backups:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, unit_id: str, blob: bytes) -> None:
        self.blobs[unit_id] = blob

    def get(self, unit_id: str) -> bytes | None:
        return self.blobs.get(unit_id)


def receiver(backups: Backups | None, unit: str | None = "unit-a") -> ReceiverSession:
    class Sink:
        def apply(self, records: Any) -> int:
            return 0

        def last_durable_seq(self) -> int:
            return 0

        def check_queue(self, queue_id: int | None) -> bool:
            return False

    return ReceiverSession(ReceiverConfig(known_units={"unit-a", "unit-b"}),
                           lambda hello: Sink(), authenticated_unit=unit, backups=backups,
                           own_backup=("remote-1", b"remote's own"))


def answers(r: ReceiverSession) -> list[Any]:
    return FrameDecoder().receive_data(r.data_to_send())


def test_a_unit_gets_its_own_backup_before_hello() -> None:
    b = Backups()
    b.put("unit-a", b"sealed a")
    r = receiver(b)
    r.receive_data(encode_frame(ConfigGet("unit-a")))
    assert answers(r) == [ConfigBlob("unit-a", b"sealed a")]
    r.receive_data(encode_frame(ConfigGet("unit-a")))
    assert answers(r) == [ConfigBlob("unit-a", b"sealed a")]
    r2 = receiver(Backups())
    r2.receive_data(encode_frame(ConfigGet("unit-a")))
    assert answers(r2) == [ConfigBlob("unit-a", None)]


def test_nobody_gets_or_overwrites_another_units_backup() -> None:
    b = Backups()
    b.put("unit-b", b"sealed b")
    r = receiver(b)
    r.receive_data(encode_frame(ConfigGet("unit-b")))
    [err] = answers(r)
    assert isinstance(err, ErrorFrame) and err.code == "identity"
    assert r.is_finished
    r = receiver(b)
    r.receive_data(encode_frame(Hello(VERSIONS, "unit-a", 4096, 512, 0, (), False)))
    r.receive_data(encode_frame(ConfigPut("unit-b", b"forged")))
    assert b.blobs == {"unit-b": b"sealed b"}
    assert isinstance(answers(r)[-1], ErrorFrame)


def test_put_after_hello_is_kept_and_the_remote_hands_over_its_own() -> None:
    b = Backups()
    r = receiver(b)
    r.receive_data(encode_frame(Hello(VERSIONS, "unit-a", 4096, 512, 0, (), False)))
    out = answers(r)
    assert out[-1] == ConfigPut("remote-1", b"remote's own")
    r.receive_data(encode_frame(ConfigPut("unit-a", b"sealed a v2")))
    assert b.blobs == {"unit-a": b"sealed a v2"}
    # A side that keeps no backups refuses them.
    r = receiver(None)
    r.receive_data(encode_frame(Hello(VERSIONS, "unit-a", 4096, 512, 0, (), False)))
    with pytest.raises(LinkProtocolError, match="keeps no config backups"):
        r.receive_data(encode_frame(ConfigPut("unit-a", b"x")))


# --------------------------------------------------------------------------- seal / restore


def make_config(path: Path) -> ConfigStore:
    store = ConfigStore(StoreSettings(str(path)))
    store.set_admin_password(PASSWORD)
    store.set("unit.name", "front-desk")
    store.set("volume.size", "4G")
    return store


def test_seal_and_restore(tmp_path: Path) -> None:
    store = make_config(tmp_path / "a.slots")
    with pytest.raises(WrongPassword):
        seal_config(store, "not the password")
    blob = seal_config(store, PASSWORD)
    assert b"front-desk" not in blob
    write_blob(tmp_path / "blob", blob)
    assert read_blob(tmp_path / "blob") == blob and read_blob(tmp_path / "none") is None

    target = ConfigStore(StoreSettings(str(tmp_path / "b.slots")))
    with pytest.raises(WrongPassword):
        restore_config(target, blob, "wrong password!")
    assert target.load().state is StoreState.BLANK
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SealTampered):
        restore_config(target, tampered, PASSWORD)
    assert target.load().state is StoreState.BLANK
    assert restore_config(target, blob, PASSWORD) >= 1
    assert target.show() == store.show()
    # A working config is not replaced by mistake.
    with pytest.raises(ConfigStoreError, match="valid config"):
        restore_config(target, blob, PASSWORD)
    assert restore_config(target, blob, PASSWORD, force=True) >= 2


# --------------------------------------------------------------------------- processes


def mirrorunit(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_recover_the_config_from_the_peer(make_pair: MakePair, tmp_path: Path) -> None:
    config = tmp_path / "config.slots"
    store = make_config(config)
    # A password set before units sealed on their own: no key, no automatic backup.
    store.update({"admin.seal_key": "", "backup.keepers": ["remote"]})
    with make_pair(size="8M", buffer_size="8M", local_extra=("--config", str(config))) as p:
        local, remote = p.local, p.remote
        kept = remote.store / p.unit_id / CONFIG_BACKUP_NAME
        wait_for(lambda: local.call("link.status")["peers"]["remote"]["state"] == "connected",
                 30, "link up")
        r = mirrorunit("link", "seal-config", "--control", str(local.control),
                       "--password-stdin", stdin="wrong password\n")
        assert r.returncode == 1 and "admin password" in r.stderr
        assert not (p.local_state / OWN_BACKUP_NAME).exists()
        assert local.log.read_text().count("no seal key is stored") == 1
        r = mirrorunit("link", "seal-config", "--control", str(local.control),
                       "--password-stdin", stdin=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        assert store.load().config["admin.seal_key"]  # type: ignore[index]
        wait_for(lambda: read_blob(kept) is not None and read_blob(kept)
                 == read_blob(p.local_state / OWN_BACKUP_NAME), 30,
                 "the remote to keep the backup")

        # The remote's own config sealed offline (this remote runs without --config,
        # so it names no keeper and hands it to nobody: see test_config_recovery).
        remote_config = tmp_path / "remote-config.slots"
        make_config(remote_config).set("unit.name", "vault")
        r = mirrorunit("link", "seal-config", "--state-dir", str(remote.state_dir),
                       "--config", str(remote_config), "--password-stdin",
                       stdin=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        assert not (p.local_state / peer_backup_name("remote")).exists()
        target = ConfigStore(StoreSettings(str(tmp_path / "restored.slots")))
        restore_config(target, (remote.state_dir / OWN_BACKUP_NAME).read_bytes(), PASSWORD)
        assert target.show()["unit.name"] == "vault"

        # The local unit's config partition is lost; it asks the remote for its copy.
        lost = tmp_path / "blank.slots"
        recover = ("config", "recover", "--from-peer", f"127.0.0.1:{remote.port}",
                   "--name", "remote", "--state-dir", str(p.local_state), "--config",
                   str(lost), "--password-stdin")
        r = mirrorunit(*recover, stdin="not the password\n")
        assert r.returncode == 1
        assert "wrong admin password; nothing was written" in r.stderr
        assert ConfigStore(StoreSettings(str(lost))).load().state is StoreState.BLANK
        r = mirrorunit(*recover, stdin=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        assert "configuration restored" in r.stdout
        assert ConfigStore(StoreSettings(str(lost))).show() == store.show()
        # Over a valid config only with --force.
        r = mirrorunit(*recover, stdin=PASSWORD + "\n")
        assert r.returncode == 1 and "valid config" in r.stderr
        assert "asked for its config backup; sent" in remote.log.read_text()
        # A peer that is not pinned under that name is refused before anything moves.
        r = mirrorunit("config", "recover", "--from-peer", f"127.0.0.1:{remote.port}",
                       "--name", "elsewhere", "--state-dir", str(p.local_state),
                       "--config", str(tmp_path / "x.slots"), "--password-stdin",
                       stdin=PASSWORD + "\n")
        assert r.returncode == 1 and "not pinned" in r.stderr
        assert not (tmp_path / "x.slots").exists()
