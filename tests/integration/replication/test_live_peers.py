"""The peers of a running local unit changed live (config `peers`): a wrong address is
corrected without restarting the unit or dropping the host's disk, a peer is removed and
added back, and a fingerprint that is not the pinned certificate is reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from firmware.config import Config
from firmware.config.live import apply_live
from firmware.config.schema import diff_live as config_diff
from firmware.nbd.client import NbdClient
from tests.support.replication import (
    MakePair,
    assert_same_image,
    peer_status,
    wait_caught_up,
    wait_for,
)
from tests.support.unitproc import free_port


def _write(local: Any, offset: int, fill: int) -> None:
    with NbdClient("127.0.0.1", local.port, "mirrorunit") as c:
        c.write(offset, bytes([fill]) * 65536)
        c.flush()


def test_a_wrong_peer_address_is_corrected_live(make_pair: MakePair, tmp_path: Path) -> None:
    pair = make_pair(size="8M", buffer_size="8M")
    local, remote, unit = pair.local, pair.remote, pair.unit_id
    fp = remote.call("status")["fingerprint"]
    right = f"127.0.0.1:{pair.proxy.address[1]}"
    wrong = f"127.0.0.1:{free_port()}"
    # The unit is pointed at an address where nothing listens.
    r = local.call("link.set_peers",
                   peers=[{"name": "remote", "address": wrong, "fingerprint": fp}])
    assert r["changed"] == ["remote"] and r["unpaired"] == []
    _write(local, 0, 1)
    wait_for(lambda: peer_status(local)["state"] == "retrying"
             and peer_status(local)["remote"] == wrong, 30, "the link to fail")
    pid = local.proc.pid if local.proc else None
    # Corrected through the config path the console and `config set` use.
    cfg = Config.defaults()
    new = cfg.replace({"peers": [{"name": "remote", "address": right, "fingerprint": fp}]})
    report = apply_live(config_diff(cfg, new), new, local.control)
    assert [k for k, _ in report.applied] == ["peers"], report.lines()
    _write(local, 65536, 2)  # the host kept its disk all along
    wait_caught_up(local, remote, unit)
    assert_same_image(local, remote, unit, tmp_path)
    assert local.proc is not None and local.proc.pid == pid  # not restarted
    # A fingerprint that is not the pinned certificate is said, not trusted.
    r = local.call("link.set_peers",
                   peers=[{"name": "remote", "address": right, "fingerprint": "ab" * 32}])
    assert r["unpaired"] == ["remote"] and r["unchanged"] == ["remote"]
    # Removed, then added back: its consumer goes, and it comes back with a full resync.
    r = local.call("link.set_peers", peers=[])
    assert r["removed"] == ["remote"]
    assert "remote" not in local.call("status")["cbq"]["consumers"]
    _write(local, 3 * 65536, 3)
    r = local.call("link.set_peers",
                   peers=[{"name": "remote", "address": right, "fingerprint": fp}])
    assert r["added"] == ["remote"]
    wait_caught_up(local, remote, unit)
    assert_same_image(local, remote, unit, tmp_path)
    assert peer_status(local)["resyncs_done"] >= 1
