"""Unattended peer backup of the config and recovery of a replaced unit from its peer:
the recovery exchange as a state machine, then real local and remote processes
over real TLS, with the console driven in a pseudo-terminal."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from firmware.config import ConfigStore, StoreSettings, StoreState, unseal
from firmware.config.kdf import Argon2Params, ScryptParams, params_from_cost
from firmware.config.seal import (
    SEAL_HEADER,
    SEAL_MAGIC,
    key_check,
    make_seal_key,
    read_header,
    seal,
    unseal_bundle,
)
from firmware.link.errors import LinkProtocolError
from firmware.link.frames import (
    PROTOCOL_VERSION,
    ConfigBlob,
    ConfigGet,
    ErrorFrame,
    FrameDecoder,
    Hello,
    RecoverChallenge,
    RecoverHello,
    RecoverProof,
    WriteRecord,
    Writes,
    encode_frame,
)
from firmware.link.recovery import (
    ERR_NAME_UNIT,
    ERR_NO_BACKUP,
    ERR_RATE_LIMITED,
    ERR_WRONG_PASSWORD,
    RecoveryGranted,
    RecoveryLimiter,
    RecoveryServerSession,
    recovery_proof,
)
from firmware.link.tls import anonymous_client_context, load_or_create_identity
from firmware.nbd.client import NbdClient
from firmware.recovery.keys import backup_key
from firmware.remote.server import CONFIG_BACKUP_NAME
from tests.support import REPO as ROOT
from tests.support.replication import MakePair, wait_for
from tests.support.terminal import DOWN, ENTER, Term
from tests.support.unitproc import read_until_closed

#: the link protocol versions a HELLO of this firmware offers
VERSIONS = (PROTOCOL_VERSION,)

PASSWORD = "correct horse battery"
#: Small costs keep the tests quick; the schemes are the real ones.
FAST = Argon2Params(memory_kib=64, time_cost=1)
FAST_SCRYPT = ScryptParams(log2_n=4, r=8, p=1)
PEER_FP = ":".join(["ab"] * 32)


# --------------------------------------------------------------------------- the seal


def test_a_stored_key_reseals_without_the_password(tmp_path: Path) -> None:
    store = ConfigStore(StoreSettings(str(tmp_path / "c.slots")))
    cfg = store.set_admin_password(PASSWORD).config
    assert cfg["admin.seal_key"].startswith("$sealkey$v2$m=131072,t=3,p=1$")
    assert "sealkey" not in repr(cfg) and "admin.seal_key" not in store.export().decode()
    assert store.show()["admin.seal_key"] == "set"
    from firmware.config.peer_backup import AutoSealer

    out = tmp_path / "config.sealed"
    sealer = AutoSealer(store, out)
    first = sealer.poll()
    assert first is not None and sealer.poll() is None  # nothing new: nothing sealed
    store.set("unit.name", "vault-2")
    second = sealer.poll()
    assert second is not None and second != first and out.read_bytes() == second
    h1, h2 = read_header(first), read_header(second)
    assert h1.salt == h2.salt and h1.nonce != h2.nonce and h1.check == h2.check
    assert unseal(second, PASSWORD)["unit.name"] == "vault-2"
    # A new password brings a new key: the old one no longer opens the next blob.
    store.set_admin_password("another password 2")
    third = sealer.poll()
    assert third is not None and read_header(third).salt != h1.salt
    assert unseal(third, "another password 2")["unit.name"] == "vault-2"


def test_version_1_blobs_still_open(tmp_path: Path) -> None:
    store = ConfigStore(StoreSettings(str(tmp_path / "c.slots")))
    cfg = store.set_admin_password(PASSWORD).config
    sk = make_seal_key(PASSWORD, FAST_SCRYPT)
    nonce = b"\x01" * 12
    header = SEAL_HEADER.pack(SEAL_MAGIC, 1, FAST_SCRYPT.log2_n, FAST_SCRYPT.r, FAST_SCRYPT.p,
                              sk.salt, nonce, sk.check)
    body = cbor2.dumps(cfg.to_document(include_secrets=True), canonical=True)
    v1 = header + AESGCM(sk.key).encrypt(nonce, body, header)
    got = unseal_bundle(v1, PASSWORD)
    assert got.version == 1 and got.identity is None and got.config == cfg
    assert struct.unpack_from("<H", seal(cfg, PASSWORD, params=FAST_SCRYPT), 8)[0] == 2
    assert struct.unpack_from("<H", seal(cfg, PASSWORD, params=FAST), 8)[0] == 3


# --------------------------------------------------------------------------- the exchange


class Backups:
    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def get(self, unit_id: str) -> bytes | None:
        return self.blobs.get(unit_id)

    def units(self) -> list[str]:
        return sorted(self.blobs)

    key_of = staticmethod(backup_key)


def _blob(tmp_path: Path) -> bytes:
    store = ConfigStore(StoreSettings(str(tmp_path / "c.slots")))
    cfg = store.set_admin_password(PASSWORD).config
    return seal(cfg, PASSWORD, params=FAST)


def _answers(s: RecoveryServerSession) -> list[Any]:
    return FrameDecoder().receive_data(s.data_to_send())


def _prove(ch: RecoverChallenge, password: str) -> bytes:
    check = key_check(password, ch.salt, params_from_cost(ch.kdf, ch.cost, "seal"))
    return recovery_proof(check, ch.nonce, PEER_FP, ch.unit_id)


def test_the_right_password_gets_the_blob_and_nothing_else_leaks(tmp_path: Path) -> None:
    blob = _blob(tmp_path)
    limiter = RecoveryLimiter(max_failures=2, window_s=60, clock=lambda: 0.0)
    s = RecoveryServerSession(Backups({"unit-a": blob}), PEER_FP, "10.0.0.9", limiter)
    s.receive_data(encode_frame(RecoverHello(None)))
    [ch] = _answers(s)
    assert isinstance(ch, RecoverChallenge) and ch.unit_id == "unit-a"
    h = read_header(blob)
    assert ch.salt == h.salt and h.check not in encode_frame(ch)  # the check stays here
    assert s.receive_data(encode_frame(RecoverProof(_prove(ch, PASSWORD)))) == \
        [RecoveryGranted("unit-a", len(blob))]
    assert _answers(s) == [ConfigBlob("unit-a", blob)] and s.is_finished

    # Wrong passwords: refused, counted, then the address waits.
    for left in (1, 0):
        s = RecoveryServerSession(Backups({"unit-a": blob}), PEER_FP, "10.0.0.9", limiter)
        s.receive_data(encode_frame(RecoverHello("unit-a")))
        [ch] = _answers(s)
        s.receive_data(encode_frame(RecoverProof(_prove(ch, "not the password"))))
        [err] = _answers(s)
        assert err.code == ERR_WRONG_PASSWORD and f"{left} attempts left" in err.text
    s = RecoveryServerSession(Backups({"unit-a": blob}), PEER_FP, "10.0.0.9", limiter)
    s.receive_data(encode_frame(RecoverHello("unit-a")))
    [err] = _answers(s)
    assert err.code == ERR_RATE_LIMITED and s.is_finished
    # Its neighbours in the same /24 wait with it; another network is not held up.
    s = RecoveryServerSession(Backups({"unit-a": blob}), PEER_FP, "10.0.0.10", limiter)
    s.receive_data(encode_frame(RecoverHello("unit-a")))
    [err] = _answers(s)
    assert err.code == ERR_RATE_LIMITED and "10.0.0.0/24" in err.text
    s = RecoveryServerSession(Backups({"unit-a": blob}), PEER_FP, "10.0.1.10", limiter)
    s.receive_data(encode_frame(RecoverHello("unit-a")))
    assert isinstance(_answers(s)[0], RecoverChallenge)


def test_a_proof_is_bound_to_its_nonce_and_peer(tmp_path: Path) -> None:
    blob = _blob(tmp_path)
    limiter = RecoveryLimiter()
    first = RecoveryServerSession(Backups({"u": blob}), PEER_FP, "a", limiter)
    first.receive_data(encode_frame(RecoverHello("u")))
    [ch1] = _answers(first)
    replay = RecoveryServerSession(Backups({"u": blob}), PEER_FP, "a", limiter)
    replay.receive_data(encode_frame(RecoverHello("u")))
    _answers(replay)
    replay.receive_data(encode_frame(RecoverProof(_prove(ch1, PASSWORD))))
    assert _answers(replay)[0].code == ERR_WRONG_PASSWORD
    check = key_check(PASSWORD, ch1.salt, FAST)
    other_peer = recovery_proof(check, ch1.nonce, ":".join(["cd"] * 32), "u")
    first.receive_data(encode_frame(RecoverProof(other_peer)))
    assert _answers(first)[0].code == ERR_WRONG_PASSWORD


@pytest.mark.parametrize("blobs,unit,code", [
    ({}, None, ERR_NO_BACKUP),
    ({"a": b"x"}, "b", ERR_NO_BACKUP),
    ({"a": b"x", "b": b"y"}, None, ERR_NAME_UNIT),
    ({"a": b"not a sealed blob at all, not even close to one, no" * 2}, "a", "backup-damaged"),
])
def test_refusals(blobs: dict[str, bytes], unit: str | None, code: str) -> None:
    s = RecoveryServerSession(Backups(blobs), PEER_FP, "a", RecoveryLimiter())
    s.receive_data(encode_frame(RecoverHello(unit)))
    [err] = _answers(s)
    assert isinstance(err, ErrorFrame) and err.code == code and s.is_finished


@pytest.mark.parametrize("frame", [
    Hello(VERSIONS, "unit-a", 4096, 512, 0, (), False),
    ConfigGet("unit-a"),
    Writes(1, "none", (WriteRecord(1, 0, b"\x01" * 512, 1),)),
    RecoverProof(b"\x00" * 32),
])
def test_anything_but_the_exchange_is_refused(tmp_path: Path, frame: Any) -> None:
    blob = _blob(tmp_path)
    s = RecoveryServerSession(Backups({"unit-a": blob}), PEER_FP, "a", RecoveryLimiter())
    with pytest.raises(LinkProtocolError, match="not allowed"):
        s.receive_data(encode_frame(frame))
    out = s.data_to_send()
    assert blob not in out and isinstance(FrameDecoder().receive_data(out)[0], ErrorFrame)


# --------------------------------------------------------------------------- processes


def mirrorunit(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def _anonymous(port: int, payload: bytes) -> bytes:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with anonymous_client_context().wrap_socket(raw) as sock:
        sock.sendall(payload)
        return read_until_closed(sock)


def test_replaced_local_unit_recovers_from_its_remote(make_pair: MakePair, tmp_path: Path) -> None:
    config = tmp_path / "local-config.slots"
    store = ConfigStore(StoreSettings(str(config)))
    store.set_admin_password(PASSWORD)
    store.update({"unit.name": "front-desk", "backup.keepers": ["remote"]})
    with make_pair(size="8M", buffer_size="8M", local_extra=("--config", str(config)),
                   remote_extra=("--recovery-max-failures", "3")) as p:
        local, remote = p.local, p.remote
        kept = remote.store / p.unit_id / CONFIG_BACKUP_NAME
        first = wait_for(lambda: kept.exists() and kept.read_bytes(), 30, "first backup")
        # A config change reaches the remote sealed, with nobody typing anything.
        remote_fp = remote.call("status")["fingerprint"]
        result = store.update({"peers": [{"name": "remote",
                                          "address": f"127.0.0.1:{remote.port}",
                                          "fingerprint": remote_fp}]})
        wait_for(lambda: kept.read_bytes() != first, 30, "the re-sealed backup")
        newer = unseal_bundle(kept.read_bytes(), PASSWORD)
        assert newer.config == result.config
        assert local.call("link.status")["config_backup"]["sealed_generation"] == \
            result.generation
        assert newer.identity is not None
        old_cfg, old_fp = result.config, local.call("link.status")["fingerprint"]
        local.stop()

        # The card is replaced: no config, no identity.
        config.unlink()
        shutil.rmtree(p.local_state)
        t = Term(["--config", str(config), "--state-dir", str(p.local_state),
                  "--control", str(tmp_path / "none.sock"), "--log-file",
                  str(tmp_path / "console.log")], tmp_path)
        try:
            t.wait("recovery", "This unit has no configuration")
            t.send("1")
            t.wait("recovery: network", "Peer address host:port", "Unit id (if asked)")
            for _ in range(5):
                t.send(DOWN)
            t.send(ENTER)
            t.line(f"127.0.0.1:{remote.port}")
            t.send(DOWN + ENTER)
            t.line(remote_fp)
            t.send("s")
            t.wait("Admin password of this unit:", f"keeps a backup of unit {p.unit_id}")
            t.line("not the password")
            t.wait("Wrong admin password", "2 attempts left", "Admin password of this unit:")
            assert not config.exists()
            t.line(PASSWORD)
            t.wait("main menu", f"Recovered unit {p.unit_id}", "link identity restored",
                   timeout=30)
        finally:
            t.close()
        assert ConfigStore(StoreSettings(str(config))).load().config == old_cfg
        assert load_or_create_identity(p.local_state, "unused").fingerprint == old_fp
        log = remote.log.read_text()
        assert "proved the admin password of unit" in log and "wrong-password" in log

        # The restored unit is the one the remote pinned: replication resumes.
        local.start()
        wait_for(lambda: local.call("link.status")["peers"]["remote"]["state"] ==
                 "connected", 30, "link up again")
        client = NbdClient("127.0.0.1", local.port, "mirrorunit")
        client.write(4096, b"\x5a" * 4096)
        client.flush()
        client.close()
        wait_for(lambda: remote.call("remote.read", unit=p.unit_id, offset=4096,
                                     length=4096) == b"\x5a" * 4096, 30, "the write remotely")
        local.stop()

        # Bad input, none of which writes anything.
        lost = tmp_path / "lost.slots"
        base = ("config", "recover", "--from-peer", f"127.0.0.1:{remote.port}",
                "--state-dir", str(tmp_path / "fresh"), "--config", str(lost),
                "--password-stdin")
        r = mirrorunit(*base, "--fingerprint", "00" * 32, stdin=PASSWORD + "\n")
        assert r.returncode == 1 and "Wrong peer fingerprint" in r.stderr
        r = mirrorunit(*base, "--fingerprint", remote_fp, "--unit", "unit-nobody",
                       stdin=PASSWORD + "\n")
        assert r.returncode == 1 and "keeps no config backup" in r.stderr
        good = kept.read_bytes()
        kept.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        r = mirrorunit(*base, "--fingerprint", remote_fp, stdin=PASSWORD + "\n")
        assert r.returncode == 1 and "damaged" in r.stderr
        kept.write_bytes(b"garbage" * 20)
        r = mirrorunit(*base, "--fingerprint", remote_fp, stdin=PASSWORD + "\n")
        assert r.returncode == 1 and "kept here is damaged: not a sealed" in r.stderr
        kept.write_bytes(good)
        assert not lost.exists() and not (tmp_path / "fresh" / "link-key.pem").exists()

        # A client without a certificate that tries anything else: closed, nothing leaked.
        for frame in (Hello(VERSIONS, p.unit_id, 8 << 20, 512, 0, (), False),
                      ConfigGet(p.unit_id)):
            reply = _anonymous(remote.port, encode_frame(frame))
            frames = FrameDecoder().receive_data(reply)
            assert len(frames) == 1 and isinstance(frames[0], ErrorFrame)
            assert "not allowed" in frames[0].text and good not in reply

        # Two more wrong passwords use up the three attempts; then even the right
        # one waits.
        for _ in range(2):
            r = mirrorunit(*base, "--fingerprint", remote_fp, stdin="wrong password!\n")
            assert r.returncode == 1 and "Wrong admin password" in r.stderr
        r = mirrorunit(*base, "--fingerprint", remote_fp, stdin=PASSWORD + "\n")
        assert r.returncode == 1 and "refuses more attempts" in r.stderr
        assert not lost.exists()
        assert ConfigStore(StoreSettings(str(lost))).load().state is StoreState.BLANK


def test_a_remote_seals_its_own_config_and_pushes_each_change(make_pair: MakePair,
                                                              tmp_path: Path) -> None:
    from firmware.config.peer_backup import peer_backup_name

    rconfig = tmp_path / "remote-config.slots"
    rstore = ConfigStore(StoreSettings(str(rconfig)))
    rstore.set_admin_password(PASSWORD)
    rstore.set_many({"role": "remote", "unit.name": "vault"})
    with make_pair(size="4M", buffer_size="4M", remote_extra=("--config", str(rconfig))) as p:
        rstore.update({"backup.keepers": [p.unit_id]})
        theirs = p.local_state / peer_backup_name("remote")
        first = wait_for(lambda: theirs.exists() and theirs.read_bytes(), 30, "remote backup")
        sessions = p.local.call("link.status")["peers"]["remote"]["sessions"]
        rstore.set("unit.name", "vault-2")
        # (the generation naming the keeper may arrive first: wait for the change)
        wait_for(lambda: theirs.read_bytes() != first
                 and unseal(theirs.read_bytes(), PASSWORD)["unit.name"] == "vault-2", 30,
                 "the re-sealed remote backup")
        # Pushed on the running session, not on a reconnect.
        assert p.local.call("link.status")["peers"]["remote"]["sessions"] == sessions


def test_a_sealed_config_goes_only_to_the_keepers_its_config_names(tmp_path: Path) -> None:
    """A remote with two pinned locals, only one of them its keeper; each local names
    (or not) the remote as its own keeper.  The blobs carry TLS private keys."""
    from firmware.config.peer_backup import OWN_BACKUP_NAME, peer_backup_name
    from firmware.demo import pair_both_ways
    from tests.support.replication import RemoteProc, local_link_args
    from tests.support.unitproc import LocalProc

    rconfig = tmp_path / "remote-config.slots"
    rstore = ConfigStore(StoreSettings(str(rconfig)))
    rstore.set_admin_password(PASSWORD)
    rstore.set_many({"role": "remote", "unit.name": "vault"})
    (tmp_path / "remote").mkdir()
    remote = RemoteProc(tmp_path / "remote", extra=("--config", str(rconfig)))
    locals_: dict[str, tuple[LocalProc, Path, str]] = {}
    for name, keepers in (("keeper", ["remote"]), ("other", [])):
        work = tmp_path / name
        work.mkdir()
        state = work / "link"
        unit_id, _ = pair_both_ways(state, remote.state_dir)
        config = work / "config.slots"
        store = ConfigStore(StoreSettings(str(config)))
        store.set_admin_password(PASSWORD)
        store.update({"unit.name": name, "backup.keepers": keepers})
        locals_[name] = (LocalProc(work, size="4M", buffer_size="4M", extra=local_link_args(
            "remote", ("127.0.0.1", remote.port), state, "--config", str(config))),
            state, unit_id)
    rstore.update({"backup.keepers": [locals_["keeper"][2]]})
    remote.start()
    try:
        for proc, _, _ in locals_.values():
            proc.start()
        keeper_state, other_state = locals_["keeper"][1], locals_["other"][1]
        keeper_id, other_id = locals_["keeper"][2], locals_["other"][2]
        theirs = keeper_state / peer_backup_name("remote")
        wait_for(lambda: theirs.exists(), 30, "the keeper to get the remote's backup")
        assert unseal_bundle(theirs.read_bytes(), PASSWORD).config["unit.name"] == "vault"
        kept = remote.store / keeper_id / CONFIG_BACKUP_NAME
        wait_for(lambda: kept.exists(), 30, "the remote to keep its keeper's backup")
        # Both sessions are up and both locals sealed their configs; the other local
        # has had the time the keeper needed and more.
        for name, (proc, state, _) in locals_.items():
            wait_for(lambda s=state: (s / OWN_BACKUP_NAME).exists(), 30, f"{name} sealed")
            wait_for(lambda p=proc: p.call("link.status")["peers"]["remote"]["state"]
                     == "connected", 30, f"{name} connected")
        rstore.set("unit.name", "vault-2")
        wait_for(lambda: unseal(theirs.read_bytes(), PASSWORD)["unit.name"] == "vault-2", 30,
                 "the keeper to get the re-sealed backup")
        assert not (other_state / peer_backup_name("remote")).exists()
        assert not (remote.store / other_id / CONFIG_BACKUP_NAME).exists()
        assert "backup.keepers names no peer" in locals_["other"][0].log.read_text()
    finally:
        for proc, _, _ in locals_.values():
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop()
        remote.stop()
