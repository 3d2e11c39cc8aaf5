"""Journey-link figures for `make bench` (`run(workdir) -> dict`).

1. Goodput through a bandwidth-capped TCP proxy as a fraction of the cap (TLS,
   framing and acks included in what the cap has to carry).
2. Checksum resync: bytes sent / changed bytes with 1% and 10% of the chunks of a
   64 MiB volume changed (sans-IO sessions into a real unit store on disk).
3. Catch-up: time for a queue of 1 GiB, left by an outage, to reach a real store
   over TLS on loopback.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from firmware.link.frames import CODEC_NONE
from firmware.link.memory import MemorySink, MemorySource
from firmware.link.session import (
    ReceiverConfig,
    ReceiverSession,
    ResyncFinished,
    ResyncPlan,
    SenderConfig,
    SenderSession,
)
from firmware.link.shell import LinkClient, LinkServer
from firmware.link.tls import PeerStore, load_or_create_identity

MiB = 1 << 20
CHUNK = 64 * 1024


def _tls_pair(workdir: Path) -> tuple[Any, Any, Any, Any]:
    local = load_or_create_identity(workdir / "local", "bench-local")
    remote = load_or_create_identity(workdir / "remote", "bench-remote")
    lp = PeerStore.in_dir(workdir / "local")
    lp.pin("remote", remote.cert_der)
    rp = PeerStore.in_dir(workdir / "remote")
    rp.pin("bench-local", local.cert_der)
    return local, lp, remote, rp


def _stream(workdir: Path, source: MemorySource, sink: Any, volume: int, last: int,
            via: tuple[str, int] | None = None, proxy_cap: Any = None) -> float:
    local, lp, remote, rp = _tls_pair(workdir)
    server = LinkServer(("127.0.0.1", 0), remote, rp,
                        ReceiverConfig(known_units={"bench-local"}), lambda h: sink)
    address = server.start()
    target: tuple[str, int] = address
    proxy = None
    if proxy_cap is not None:
        proxy = proxy_cap(address)
        target = proxy.address
    client = LinkClient(target, local, lp, "remote",
                        SenderConfig("bench-local", volume, 512, compression=(CODEC_NONE,)),
                        source)
    t0 = time.perf_counter()
    client.start()
    try:
        if not client.wait_acked(last, timeout=600):
            raise RuntimeError("link bench did not finish in 600 s")
        return time.perf_counter() - t0
    finally:
        client.stop()
        server.stop()
        if proxy is not None:
            proxy.close()


def bench_capped_throughput(workdir: Path, cap: int = 4 * MiB,
                            total: int = 24 * MiB) -> dict[str, Any]:
    # The fault proxy lives with the tests; the bench runs from the repository.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support.faultproxy import FaultProxy

    def make_proxy(address: tuple[str, int]) -> Any:
        p = FaultProxy(address)
        p.set_bandwidth(cap)
        return p

    src = MemorySource()
    block = os.urandom(CHUNK)
    volume = 64 * MiB
    for i in range(total // CHUNK):
        src.append((i * CHUNK % volume) // 512, block)
    sink = MemorySink(volume, 512)
    secs = _stream(workdir / "capped", src, sink, volume, src.last_seq, proxy_cap=make_proxy)
    goodput = total / secs
    return {"cap_bytes_per_s": cap, "payload_bytes": total, "seconds": round(secs, 2),
            "goodput_bytes_per_s": round(goodput), "fraction_of_cap": round(goodput / cap, 3),
            "goal": ">= 0.95"}


class _ImageSource(MemorySource):
    chunk_size = CHUNK

    def __init__(self, image: bytearray, plan: ResyncPlan) -> None:
        super().__init__()
        self.image = image
        self.plan: ResyncPlan | None = plan

    def resync_plan(self, remote_durable: int) -> ResyncPlan | None:
        plan, self.plan = self.plan, None
        return plan

    def read_chunk(self, chunk: int) -> bytes:
        return bytes(self.image[chunk * CHUNK:(chunk + 1) * CHUNK])

    def resync_finished(self, plan: ResyncPlan, differing: list[int], seq: int) -> None:
        pass


def bench_resync(workdir: Path, fraction: float, volume: int = 64 * MiB) -> dict[str, Any]:
    from firmware.remote.server import UnitSink
    from firmware.remote.store import RemoteStore

    rng = random.Random(int(fraction * 1000))
    base = bytearray(rng.randbytes(volume))
    store = RemoteStore(workdir / f"resync-{fraction}")
    unit = store.open_unit("bench", volume, 512)
    for c in range(volume // CHUNK):
        unit.write_chunk(c, bytes(base[c * CHUNK:(c + 1) * CHUNK]))
    unit.resync_complete(0)
    nchunks = volume // CHUNK
    changed = rng.sample(range(nchunks), max(1, int(nchunks * fraction)))
    for c in changed:
        base[c * CHUNK:(c + 1) * CHUNK] = rng.randbytes(CHUNK)
    src = _ImageSource(base, ResyncPlan(False, 0, tuple(range(nchunks))))
    sender = SenderSession(SenderConfig("bench", volume, 512, compression=(CODEC_NONE,)), src)
    receiver = ReceiverSession(ReceiverConfig(known_units={"bench"}), lambda h: UnitSink(unit))
    sender.start()
    sent = back = 0
    result: ResyncFinished | None = None
    t0 = time.perf_counter()
    while result is None:
        sender.pump()
        out = sender.data_to_send()
        sent += len(out)
        events = receiver.receive_data(out) if out else []
        reply = receiver.data_to_send()
        back += len(reply)
        for e in sender.receive_data(reply) if reply else []:
            if isinstance(e, ResyncFinished):
                result = e
        if not out and not reply and result is None:
            raise RuntimeError(f"resync stalled: {events}")
    secs = time.perf_counter() - t0
    same = hashlib.blake2b(unit.read_mirror(0, volume)).digest() == hashlib.blake2b(
        bytes(base)).digest()
    store.close()
    changed_bytes = len(changed) * CHUNK
    return {"volume_bytes": volume, "changed_fraction": fraction,
            "changed_bytes": changed_bytes, "chunk_bytes_sent": result.bytes_sent,
            "local_to_remote_wire_bytes": sent, "remote_to_local_wire_bytes": back,
            "ratio_data": round(result.bytes_sent / changed_bytes, 4),
            "ratio_wire": round(sent / changed_bytes, 4),
            "digest_overhead_bytes": back, "seconds": round(secs, 2), "converged": same,
            "goal": "ratio_wire <= 1.05 (+ digests, which flow remote -> local)"}


def bench_catch_up(workdir: Path, queued: int = 1024 * MiB) -> dict[str, Any]:
    from firmware.remote.server import UnitSink
    from firmware.remote.store import RemoteStore

    volume = 512 * MiB
    store = RemoteStore(workdir / "catchup")
    unit = store.open_unit("bench-local", volume, 512)
    src = MemorySource()
    blocks = [os.urandom(CHUNK) for _ in range(16)]
    for i in range(queued // CHUNK):
        src.append((i * CHUNK % volume) // 512, blocks[i % 16])
    secs = _stream(workdir / "catchup-tls", src, UnitSink(unit), volume, src.last_seq)
    store.close()
    return {"queued_bytes": queued, "seconds": round(secs, 2),
            "bytes_per_s": round(queued / secs)}


def run(workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    print("Journey link through a bandwidth-capped proxy ...")
    out["capped_throughput"] = r = bench_capped_throughput(workdir)
    print("  " + ", ".join(f"{k} {v}" for k, v in r.items()))
    for pct in (1, 10):
        print(f"Checksum resync with {pct}% of the chunks changed ...")
        out[f"resync_{pct}pct"] = r = bench_resync(workdir, pct / 100)
        print(f"  data ratio {r['ratio_data']}, wire ratio {r['ratio_wire']} (goal <= 1.05), "
              f"digest bytes {r['digest_overhead_bytes']}")
    print("Catch-up after an outage that queued 1 GiB ...")
    out["catch_up"] = r = bench_catch_up(workdir)
    print(f"  {r['seconds']} s ({r['bytes_per_s'] / MiB:.0f} MiB/s)")
    return out


if __name__ == "__main__":
    import json

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(Path(d)), indent=2))
