"""Notifications: event detection from status sequences, rate limiting, and delivery to
real receivers on loopback (snmptrapd for SNMP v2c/v3 traps, aiosmtpd for e-mail)."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from firmware.config import ConfigStore, StoreSettings
from firmware.config.kdf import Argon2Params
from firmware.config.schema import Config
from firmware.config.seal import seal
from firmware.control import ControlServer
from firmware.control.status import LocalStatus, RemoteStatus, read_unit_status
from firmware.link.frames import (
    ErrorFrame,
    FrameDecoder,
    RecoverChallenge,
    RecoverHello,
    RecoverProof,
    encode_frame,
)
from firmware.link.tls import anonymous_client_context
from firmware.notify import (
    EmailSender,
    Event,
    EventDetector,
    EventKind,
    Notifier,
    RateLimiter,
    Severity,
    SnmpTrapSender,
)
from firmware.notify.senders import build_senders, engine_id_for
from firmware.remote.server import CONFIG_BACKUP_NAME
from tests.support import REPO as ROOT
from tests.support.replication import RemoteProc
from tests.support.status import local_status, peer, remote_status
from tests.support.unitproc import read_until_closed

K = EventKind


def status(fill: float = 0.1, mode: str = "normal", needs_resync: bool = False,
           peers: dict[str, str] | None = None, ups: str | None = None,
           charge: float = 80.0) -> LocalStatus:
    """A complete status answer; `peers` maps a peer name to its link state."""
    return local_status(fill, mode, needs_resync,
                        None if peers is None else {n: peer(st, "connection refused"
                                                            if st == "retrying" else None)
                                                    for n, st in peers.items()},
                        ups, charge)


def kinds(events: list[Event]) -> list[tuple[EventKind, str]]:
    return [(e.kind, e.subject) for e in events]


def test_buffer_and_resync_edges() -> None:
    d = EventDetector()
    assert d.feed(status(), 0) == []
    assert d.feed(status(fill=0.5), 1) == []
    ev = d.feed(status(fill=0.85, mode="compact"), 2)
    assert kinds(ev) == [(K.BUFFER_HIGH_WATER, "")]
    assert "85% full" in ev[0].text and "80%" in ev[0].text
    assert d.feed(status(fill=0.9, mode="compact"), 3) == []  # still past: said once
    ev = d.feed(status(fill=1.0, mode="overflow", needs_resync=True), 4)
    assert kinds(ev) == [(K.BUFFER_OVERFLOW, ""), (K.REMOTE_OUT_OF_SYNC, "remote")]
    assert "checksum resync" in ev[1].text
    ev = d.feed(status(fill=0.1), 5)
    assert kinds(ev) == [(K.RESYNC_FINISHED, "remote")]
    ev = d.feed(status(fill=0.82), 6)  # past high water again: a new edge
    assert kinds(ev) == [(K.BUFFER_HIGH_WATER, "")]


def test_trouble_present_at_start_is_reported_once() -> None:
    d = EventDetector()
    ev = d.feed(status(fill=0.9, needs_resync=True, ups="OB DISCHRG"), 0)
    assert kinds(ev) == [(K.BUFFER_HIGH_WATER, ""), (K.REMOTE_OUT_OF_SYNC, "remote"),
                         (K.ON_BATTERY, "")]
    assert d.feed(status(fill=0.9, needs_resync=True, ups="OB DISCHRG"), 1) == []


@pytest.mark.parametrize("down", ["retrying", "fenced", "split-brain", "diverged"])
def test_link_down_and_restored(down: str) -> None:
    d = EventDetector()
    assert d.feed(status(peers={"r1": "connected"}), 0) == []
    ev = d.feed(status(peers={"r1": down}), 1)
    assert kinds(ev) == [(K.LINK_DOWN, "r1")]
    assert "The link to r1 is down" in ev[0].text
    assert d.feed(status(peers={"r1": down}), 2) == []
    assert kinds(d.feed(status(peers={"r1": "resyncing"}), 3)) == [(K.LINK_RESTORED, "r1")]


def test_paused_links_are_not_an_alarm_and_each_peer_has_its_own_edge() -> None:
    d = EventDetector()
    assert d.feed(status(peers={"r1": "connected", "r2": "connected"}), 0) == []
    assert d.feed(status(peers={"r1": "connected", "r2": "paused"}), 1) == []
    assert kinds(d.feed(status(peers={"r1": "connected", "r2": "retrying"}), 2)) == \
        [(K.LINK_DOWN, "r2")]
    assert kinds(d.feed(status(peers={"r1": "retrying", "r2": "retrying"}), 3)) == \
        [(K.LINK_DOWN, "r1")]


def test_fencing_and_split_brain_are_said_once_each() -> None:
    d = EventDetector()
    assert d.feed(status(peers={"r1": "connected"}), 0) == []
    fenced = status(peers={"r1": "fenced"})
    fenced["link"]["peers"]["r1"]["fenced"] = "promoted at seq 80 on ...; this copy is stale"
    ev = d.feed(fenced, 1)
    assert kinds(ev) == [(K.FENCED, "r1"), (K.LINK_DOWN, "r1")]
    assert "promoted at seq 80" in ev[0].text and "role failback" in ev[0].text
    assert d.feed(fenced, 2) == []
    split = status(peers={"r1": "split-brain"})
    split["link"]["peers"]["r1"]["split_brain"] = "split brain after seq 38"
    ev = d.feed(split, 3)
    assert kinds(ev) == [(K.SPLIT_BRAIN, "r1")] and "give-up-here" in ev[0].text


def _with_host(connection: str, queued: int) -> LocalStatus:
    st = status()
    st["cbq"].update({"queued_records": queued, "queued_bytes": 4096 * queued})
    st["usb"] = {"gadget": "mirrorunit", "udc": "dummy_udc.0", "serving": True,
                 "read_only": False, "bot_state": "idle",
                 "host": {"connection": connection, "udc_state": connection, "changes": 1}}
    return st


def test_a_host_that_leaves_with_writes_queued_is_said_once() -> None:
    d = EventDetector()
    assert d.feed(_with_host("not-attached", 0), 0) == []  # booted before the host
    assert d.feed(_with_host("configured", 0), 1) == []
    assert d.feed(_with_host("not-attached", 0), 2) == []  # nothing queued: no alarm
    assert d.feed(_with_host("configured", 3), 3) == []
    ev = d.feed(_with_host("suspended", 3), 4)
    assert kinds(ev) == [(K.HOST_DISCONNECTED, "")]
    assert "3 of its writes (12288 bytes) are still queued" in ev[0].text
    assert d.feed(_with_host("not-attached", 2), 5) == []
    assert kinds(d.feed(_with_host("configured", 0), 6)) == [(K.HOST_CONNECTED, "")]


def test_ups_events() -> None:
    d = EventDetector()
    assert d.feed(status(ups="OL CHRG"), 0) == []
    ev = d.feed(status(ups="OB DISCHRG", charge=64), 1)
    assert kinds(ev) == [(K.ON_BATTERY, "")] and "charge 64%" in ev[0].text
    ev = d.feed(status(ups="OB DISCHRG LB", charge=15), 2)
    assert kinds(ev) == [(K.LOW_BATTERY, "")] and ev[0].severity is Severity.CRITICAL
    assert kinds(d.feed(status(ups="OL CHRG"), 3)) == [(K.MAINS_RESTORED, "")]


def test_unreachable_unit() -> None:
    d = EventDetector()
    assert kinds(d.unreachable("refused", 0)) == [(K.UNIT_UNREACHABLE, "")]
    assert d.unreachable("refused", 1) == []
    assert kinds(d.feed(status(), 2)) == [(K.UNIT_REACHABLE, "")]


def guess_limits(lockouts: int, locked_for: float = 0.0) -> dict[str, Any]:
    return {"recovery": {"what": "recovery", "lockouts": lockouts, "locked_for_s": locked_for,
                         "window_s": 600.0, "unit_max_failures": 50,
                         "last_lockout": None if not lockouts else {
                             "length_s": 600.0 * 2 ** (lockouts - 1), "failures": 51,
                             "number": lockouts,
                             "prefixes": [[f"10.0.{i}.0/24", 12 - i] for i in range(12)]}}}


def remote(limits: Any) -> RemoteStatus:
    """A remote's status answer, checked as the notifier checks it."""
    st = read_unit_status(remote_status(limits))
    assert st["role"] == "remote"
    return st  # type: ignore[return-value]


def test_a_guess_lockout_is_reported_once_per_lockout() -> None:
    d = EventDetector()
    assert d.feed(remote(guess_limits(0)), 0) == []
    ev = d.feed(remote(guess_limits(1, 599.0)), 1)
    assert kinds(ev) == [(K.GUESS_LOCKOUT, "recovery")] and ev[0].severity is Severity.CRITICAL
    assert "refused for 600.0 s" in ev[0].text and "51 within 600.0 s" in ev[0].text
    assert "12 source network(s) (10.0.0.0/24: 12, 10.0.1.0/24: 11" in ev[0].text
    assert "10.0.10.0/24" not in ev[0].text and "and 2 more" in ev[0].text
    assert d.feed(remote(guess_limits(1, 500.0)), 2) == []
    ev = d.feed(remote(guess_limits(2, 1200.0)), 3)
    assert kinds(ev) == [(K.GUESS_LOCKOUT, "recovery")] and "1200.0 s" in ev[0].text
    # A notifier started during a lockout reports it; one long over is history.
    assert kinds(EventDetector().feed(remote(guess_limits(3, 10.0)), 0)) == \
        [(K.GUESS_LOCKOUT, "recovery")]
    assert EventDetector().feed(remote(guess_limits(3, 0.0)), 0) == []


def test_rate_limiter_counts_what_it_dropped() -> None:
    lim = RateLimiter(60)
    ev = Event(K.LINK_DOWN, Severity.CRITICAL, "down", "r1")
    assert lim.admit(ev, 0) is ev
    assert lim.admit(ev, 10) is None and lim.admit(ev, 59) is None
    other = Event(K.LINK_DOWN, Severity.CRITICAL, "down", "r2")
    assert lim.admit(other, 20) is other  # per subject
    again = lim.admit(ev, 61)
    assert again is not None and again.suppressed == 2
    last = lim.admit(ev, 130)
    assert last is not None and last.suppressed == 0


# ------------------------------------------------------------------ real receivers


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.arrived = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg: Any = email.message_from_bytes(envelope.content,
                                            policy=email.policy.default)  # type: ignore[arg-type]
        with self.arrived:
            self.messages.append(msg)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self.arrived.notify_all()
        return "250 OK"

    def wait(self, n: int, timeout: float = 20.0) -> list[email.message.EmailMessage]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.messages) >= n, timeout), \
                f"{len(self.messages)} of {n} messages arrived"
            return list(self.messages)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    ctl = Controller(box, hostname="127.0.0.1", port=port)
    ctl.start()
    yield box, port
    ctl.stop()


class TrapReceiver:
    def __init__(self, log: Path) -> None:
        self.log = log

    def traps(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if ".1.3.6.1.3.8472.1.1" in line]

    def wait(self, n: int, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.traps()) < n:
            assert time.monotonic() < deadline, f"{len(self.traps())} of {n} traps arrived"
            time.sleep(0.05)  # polling the receiver's log file
        return self.traps()


V3_USER, V3_AUTH, V3_PRIV = "opsuser", "auth-pass-123", "priv-pass-456"


@pytest.fixture()
def snmptrapd(tmp_path: Path) -> Iterator[tuple[TrapReceiver, int]]:
    binary = shutil.which("snmptrapd") or "/usr/sbin/snmptrapd"
    if not os.path.exists(binary):
        pytest.skip("snmptrapd is not installed (Debian package snmptrapd; "
                    "scripts/setup-system.sh installs it)")
    port = free_port(socket.SOCK_DGRAM)
    engine = engine_id_for("lab-1", "SN-1").hex()
    conf = tmp_path / "snmptrapd.conf"
    conf.write_text(f"authCommunity log public\n"
                    f"createUser -e 0x{engine} {V3_USER} SHA {V3_AUTH} AES {V3_PRIV}\n"
                    f"authUser log {V3_USER} priv\n")
    log = tmp_path / "traps.log"
    env = dict(os.environ, SNMP_PERSISTENT_DIR=str(tmp_path / "persist"), MIBS="")
    proc = subprocess.Popen([binary, "-f", "-n", "-On", "-C", "-c", str(conf), "-Lf", str(log),
                             "-p", str(tmp_path / "pid"), f"udp:127.0.0.1:{port}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while "NET-SNMP version" not in (log.read_text(errors="replace") if log.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, "snmptrapd did not start"
        time.sleep(0.05)  # waiting for the receiver to be ready
    yield TrapReceiver(log), port
    proc.terminate()
    proc.wait(timeout=10)


def test_snmp_v2c_and_v3_traps_reach_snmptrapd(snmptrapd: tuple[TrapReceiver, int]) -> None:
    rx, port = snmptrapd
    ev = Event(K.LINK_DOWN, Severity.CRITICAL, "The link to r1 is down (refused).", "r1",
               suppressed=3)
    SnmpTrapSender("127.0.0.1", port, community="public").send(ev, "lab-1")
    line = rx.wait(1)[0]
    assert "OID: .1.3.6.1.3.8472.0.3" in line
    assert '.1.3.6.1.3.8472.1.1 = STRING: "lab-1"' in line
    assert 'STRING: "The link to r1 is down (refused)."' in line
    assert '.1.3.6.1.3.8472.1.4 = STRING: "r1"' in line
    assert '.1.3.6.1.3.8472.1.5 = STRING: "link-down"' in line
    assert ".1.3.6.1.3.8472.1.6 = INTEGER: 3" in line
    engine = engine_id_for("lab-1", "SN-1")
    SnmpTrapSender("127.0.0.1", port, v3_user=V3_USER, auth_key=V3_AUTH, priv_key=V3_PRIV,
                   engine_id=engine).send(Event(K.ON_BATTERY, Severity.WARNING, "on battery"),
                                          "lab-1")
    line = rx.wait(2)[1]
    assert "OID: .1.3.6.1.3.8472.0.7" in line and '"on battery"' in line
    # A wrong passphrase is dropped by the receiver, not logged as a trap.
    SnmpTrapSender("127.0.0.1", port, v3_user=V3_USER, auth_key="wrong-pass-1",
                   priv_key=V3_PRIV, engine_id=engine).send(
        Event(K.TEST, Severity.INFO, "should not arrive"), "lab-1")
    SnmpTrapSender("127.0.0.1", port, community="public").send(
        Event(K.TEST, Severity.INFO, "marker"), "lab-1")
    traps = rx.wait(3)
    assert "marker" in traps[2] and not any("should not arrive" in t for t in traps)


def test_email_reaches_an_smtp_server(smtp: tuple[Mailbox, int]) -> None:
    box, port = smtp
    sender = EmailSender(f"127.0.0.1:{port}", "unit@example.com",
                         ["ops@example.com", "oncall@example.org"])
    sender.send(Event(K.REMOTE_OUT_OF_SYNC, Severity.CRITICAL, "Remote r1 is out of sync.",
                      "r1", time=1_700_000_000.0, suppressed=2), "lab-1")
    msg = box.wait(1)[0]
    assert box.envelopes[0] == ("unit@example.com", ["ops@example.com", "oncall@example.org"])
    assert msg["Subject"] == "[lab-1] CRITICAL: remote-out-of-sync (r1)"
    body = msg.get_content()  # type: ignore[attr-defined]
    assert body.startswith("Remote r1 is out of sync.")
    assert "Peer:     r1" in body and "2 earlier repeats" in body


def configured_store(path: Path, smtp_port: int, trap_port: int | None) -> ConfigStore:
    store = ConfigStore(StoreSettings(str(path)))
    changes = {"unit.name": "lab-1", "unit.serial": "SN-1",
               "notify.email.recipients": "ops@example.com",
               "notify.email.relay": f"127.0.0.1:{smtp_port}",
               "notify.email.from": "unit@example.com"}
    if trap_port is not None:
        changes["notify.snmp"] = (f'[{{"host": "127.0.0.1:{trap_port}", '
                                  f'"community": "public"}}]')
    store.set_many(changes)
    return store


class FakeUnit:
    """A control server answering `status` with whatever the test sets."""

    def __init__(self, path: Path) -> None:
        self.status: Any = status()
        self.server = ControlServer(path, {"status": lambda: self.status})


def test_notifier_polls_a_unit_and_sends(tmp_path: Path, smtp: tuple[Mailbox, int],
                                         snmptrapd: tuple[TrapReceiver, int]) -> None:
    box, smtp_port = smtp
    rx, trap_port = snmptrapd
    store = configured_store(tmp_path / "c.slots", smtp_port, trap_port)
    sock = tmp_path / "unit.sock"
    unit = FakeUnit(sock)
    clock = [1000.0]
    n = Notifier(store, sock, rate_limit_s=60, clock=lambda: clock[0])
    # No unit yet: that is itself an event.
    assert kinds(n.poll_once()) == [(K.UNIT_UNREACHABLE, "")]
    unit.server.start()
    try:
        assert kinds(n.poll_once()) == [(K.UNIT_REACHABLE, "")]
        unit.status = status(peers={"r1": "connected"})
        assert n.poll_once() == []
        for i in range(3):  # a flapping link: one message per minute
            clock[0] += 5
            unit.status = status(peers={"r1": "retrying"})
            sent = n.poll_once()
            assert kinds(sent) == ([(K.LINK_DOWN, "r1")] if i == 0 else [])
            clock[0] += 5
            unit.status = status(peers={"r1": "connected"})
            assert kinds(n.poll_once()) == ([(K.LINK_RESTORED, "r1")] if i == 0 else [])
        clock[0] += 61
        unit.status = status(peers={"r1": "retrying"})
        sent = n.poll_once()
        assert kinds(sent) == [(K.LINK_DOWN, "r1")] and sent[0].suppressed == 2
        msgs = box.wait(4)
        assert [m["Subject"] for m in msgs] == [
            "[lab-1] CRITICAL: unit-unreachable", "[lab-1] INFO: unit-reachable",
            "[lab-1] CRITICAL: link-down (r1)", "[lab-1] INFO: link-restored (r1)",
            "[lab-1] CRITICAL: link-down (r1)"][:len(msgs)]
        box.wait(5)
        assert len(rx.wait(5)) == 5
        # Targets change live: dropping e-mail stops mail at the next poll.
        store.set_many({"notify.email.recipients": ""})
        clock[0] += 5
        unit.status = status(peers={"r1": "retrying"}, ups="OB DISCHRG")
        assert kinds(n.poll_once()) == [(K.ON_BATTERY, "")]
        assert len(rx.wait(6)) == 6 and len(box.messages) == 5
        assert all(res == "sent" for _, results in n.history for _, res in results)
        # An answer that does not have the documented shape leaves the unit unwatched:
        # said as such, naming the field, and the next good answer ends it.
        clock[0] += 5
        unit.status = {**status(), "cbq": {"fill": "full"}}
        ev = n.poll_once()
        assert kinds(ev) == [(K.UNIT_UNREACHABLE, "")]
        assert "malformed" in ev[0].text and "status.cbq.mode: missing" in ev[0].text
        unit.status = status(peers={"r1": "retrying"}, ups="OB DISCHRG")
        assert kinds(n.poll_once()) == [(K.UNIT_REACHABLE, "")]
    finally:
        unit.server.stop()


def _wrong_proof(port: int, source: str, unit: str) -> list[Any]:
    """One recovery attempt with a wrong proof from `source`; the frames answered."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10,
                                   source_address=(source, 0))
    with anonymous_client_context().wrap_socket(raw) as sock:
        sock.sendall(encode_frame(RecoverHello(unit)))
        decoder = FrameDecoder()
        frames: list[Any] = []
        while not frames:
            data = sock.recv(65536)
            assert data, "closed before the challenge"
            frames += decoder.receive_data(data)
        if isinstance(frames[0], RecoverChallenge):
            sock.sendall(encode_frame(RecoverProof(os.urandom(32))))
            frames += decoder.receive_data(read_until_closed(sock))
        return frames


def test_a_lockout_of_the_recovery_budget_is_mailed(tmp_path: Path,
                                                   smtp: tuple[Mailbox, int]) -> None:
    """A real remote whose unit-wide budget trips, and the notifier polling it."""
    box, smtp_port = smtp
    store = configured_store(tmp_path / "c.slots", smtp_port, None)
    (tmp_path / "remote").mkdir()
    remote = RemoteProc(tmp_path / "remote", extra=(
        "--recovery-max-failures", "2", "--recovery-unit-max-failures", "3"))
    kept = remote.store / "unit-a" / CONFIG_BACKUP_NAME
    kept.parent.mkdir(parents=True)
    kept.write_bytes(seal(Config.defaults(), "correct horse battery",
                          params=Argon2Params(memory_kib=64, time_cost=1)))
    remote.start()
    try:
        n = Notifier(store, remote.control, rate_limit_s=60)
        assert n.poll_once() == []
        # Two networks, two wrong proofs each: four on the unit, over its budget of 3.
        codes = [f.code for src in ("127.0.1.1", "127.0.2.1") for _ in range(2)
                 for f in _wrong_proof(remote.port, src, "unit-a") if isinstance(f, ErrorFrame)]
        assert codes == ["wrong-password"] * 4
        [refused] = _wrong_proof(remote.port, "127.0.3.1", "unit-a")
        assert isinstance(refused, ErrorFrame) and refused.code == "rate-limited"
        assert "every source waits" in refused.text
        sent = n.poll_once()
        assert kinds(sent) == [(K.GUESS_LOCKOUT, "recovery")]
        msg = box.wait(1)[0]
        assert msg["Subject"] == "[lab-1] CRITICAL: guess-lockout (recovery)"
        body = msg.get_content()  # type: ignore[attr-defined]
        assert "refused for 600.0 s (lockout 1" in body and "4 within 600.0 s" in body
        assert "127.0.1.0/24: 2, 127.0.2.0/24: 2" in body
        assert n.poll_once() == []  # said once
        assert "every source is locked out for 600 s (lockout 1)" in remote.log.read_text()
    finally:
        remote.stop()


def test_the_notifier_watches_the_role_its_config_names(tmp_path: Path) -> None:
    from firmware.apps.notify.cli import default_control
    from firmware.control import LOCAL_SOCKET, REMOTE_SOCKET

    store = ConfigStore(StoreSettings(str(tmp_path / "c.slots")))
    assert default_control(store) == LOCAL_SOCKET  # blank: the local's, as before
    store.set("role", "remote")
    assert default_control(store) == REMOTE_SOCKET
    store.set("role", "local")
    assert default_control(store) == LOCAL_SOCKET


def test_notify_test_command(tmp_path: Path, smtp: tuple[Mailbox, int]) -> None:
    box, port = smtp
    cfg = tmp_path / "c.slots"
    configured_store(cfg, port, None)
    r = subprocess.run([sys.executable, "-m", "firmware", "notify", "test", "--config",
                        str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"e-mail via 127.0.0.1:{port} to ops@example.com: sent" in r.stdout
    assert box.wait(1)[0]["Subject"] == "[lab-1] INFO: test"
    # A dead relay is reported per target with a failing exit code.
    ConfigStore(StoreSettings(str(cfg))).set("notify.email.relay", f"127.0.0.1:{free_port()}")
    r = subprocess.run([sys.executable, "-m", "firmware", "notify", "test", "--config",
                        str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "failed" in r.stdout


def test_build_senders_from_config() -> None:
    from firmware.config import Config

    cfg = Config.defaults().replace({
        "notify.snmp": [{"host": "nms:1162", "community": "c"},
                        {"host": "10.0.0.9:162", "v3_user": "ops"}],
        "notify.snmp_v3_auth_key": "auth-pass-1"})
    senders = build_senders(cfg)
    assert [s.target for s in senders] == ["snmp nms:1162 (v2c)",
                                           "snmp 10.0.0.9:162 (v3 user ops)"]
