"""Journey-link figures for `make bench` (`run(workdir) -> dict`).

1. Goodput through a bandwidth-capped TCP proxy as a fraction of the cap (TLS,
   framing and acks included in what the cap has to carry).
2. Checksum resync: bytes sent / changed bytes with 1% and 10% of the chunks of a
   64 MiB volume changed (sans-IO sessions into a real unit store on disk).
3. Catch-up: time for a queue of 1 GiB, left by an outage, to reach a real store
   over TLS on loopback.
4. Verify: `link verify` of a 200 GiB sparse volume (a few MiB of data in holes) and
   of a dense 1 GiB one, a real local volume (CBQ + mirror file) and a real store
   over TLS on loopback, against one plain read of the dense volume's file.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from firmware.link.frames import CODEC_NONE, chunk_digest
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


def _evict(path: Path) -> None:
    """Drop the file's clean pages from the page cache: the next read is the disk's."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


#: The reference read streams like the digests do: 4 MiB reads, the kernel told
#: 64 MiB ahead what comes next (POSIX_FADV_WILLNEED), so the floor is the disk's own
#: speed and not that of one synchronous 1 MiB read after another.
_READ = 4 * MiB
_AHEAD = 64 * MiB


def _stream_read(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        told = 0
        off = 0
        while off < size:
            while told < min(size, off + 2 * _AHEAD):
                os.posix_fadvise(fd, told, _AHEAD, os.POSIX_FADV_WILLNEED)
                told += _AHEAD
            off += len(os.pread(fd, _READ, off)) or _READ
    finally:
        os.close(fd)


def _plain_read_seconds(path: Path, size: int) -> float:
    """One read of the whole file from the disk."""
    _evict(path)
    t0 = time.perf_counter()
    _stream_read(path, size)
    return time.perf_counter() - t0


def _paired_read_seconds(paths: tuple[Path, Path], size: int) -> float:
    """Both files read from the disk at once, as both ends of a verify on this one
    machine do: the floor of a dense verify where local and remote share a disk."""
    from concurrent.futures import ThreadPoolExecutor

    for path in paths:
        _evict(path)
    with ThreadPoolExecutor(2) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda p: _stream_read(p, size), paths))
        return time.perf_counter() - t0


def _cpu_seconds() -> float:
    """User + system CPU time of this process (both ends of the bench run in it)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ram_disk(need: int) -> Path | None:
    """A RAM-backed directory with room for `need` bytes (/dev/shm), or None."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    return shm if st.f_bavail * st.f_frsize > 2 * need else None


def bench_verify(workdir: Path, volume: int, dense: bool, timeout: float = 900.0,
                 remote_dir: Path | None = None) -> dict[str, Any]:
    """A verify between a local volume and a remote store holding the same data:
    `dense` fills every byte (random), else one 64 KiB chunk in every 256 MiB.  The
    remote's store is under `remote_dir` when given (another medium than the local's
    mirror: two units each read their own disk), else beside the local's."""
    workdir.mkdir(parents=True, exist_ok=True)
    unit_id = "bench-local"
    store_dir = workdir / "store"
    if remote_dir is not None:
        store_dir = Path(tempfile.mkdtemp(prefix="mirrorunit-bench-", dir=remote_dir))
    try:
        return _bench_verify(workdir, store_dir, unit_id, volume, dense, timeout,
                             remote_dir is not None)
    finally:
        if remote_dir is not None:
            shutil.rmtree(store_dir, ignore_errors=True)


def _bench_verify(workdir: Path, store_dir: Path, unit_id: str, volume: int, dense: bool,
                  timeout: float, own_medium: bool) -> dict[str, Any]:
    from firmware.cbq import CircularBufferQueue
    from firmware.cbq.superblock import create
    from firmware.local.replication import CbqSource
    from firmware.remote.server import UnitSink
    from firmware.remote.store import RemoteStore
    from firmware.storage import FileStorage
    from firmware.volume.volume import Volume

    store = RemoteStore(store_dir)
    unit = store.open_unit(unit_id, volume, 512)
    remote_mirror = next(store_dir.rglob("mirror*"))
    store.close()
    local_mirror = workdir / "mirror.img"
    with open(local_mirror, "wb") as f:
        f.truncate(volume)
    rng = random.Random(7)
    spots = range(0, volume, MiB) if dense else range(0, volume, 256 * MiB)
    for path in (local_mirror, remote_mirror):
        fd = os.open(path, os.O_WRONLY)
        try:
            rng.seed(7)
            for off in spots:
                os.pwrite(fd, rng.randbytes(MiB if dense else CHUNK), off)
            os.fsync(fd)
        finally:
            os.close(fd)
    plain = _plain_read_seconds(local_mirror, volume) if dense else None
    paired = _paired_read_seconds((local_mirror, remote_mirror), volume) if dense else None
    for path in (local_mirror, remote_mirror):
        _evict(path)
    store = RemoteStore(store_dir)
    unit = store.open_unit(unit_id, volume, 512)
    cbq_storage = FileStorage(workdir / "cbq.img", size=16 * MiB, create=True)
    create(cbq_storage, volume_blocks=volume // 512, block_size=512, consumers=("remote",))
    cbq = CircularBufferQueue(cbq_storage)
    vol = Volume(FileStorage(local_mirror, size=volume), cbq)
    state = workdir / "state"
    state.mkdir(exist_ok=True)
    src = CbqSource(cbq, "remote", vol, state)
    if cbq.consumers["remote"].needs_resync:
        cbq.resync_done("remote")  # both sides hold the same data: verify, not resync
    src.request_verify()
    local, lp, remote, rp = _tls_pair(workdir / "tls")
    server = LinkServer(("127.0.0.1", 0), remote, rp,
                        ReceiverConfig(known_units={unit_id}), lambda h: UnitSink(unit))
    address = server.start()
    client = LinkClient(address, local, lp, "remote",
                        SenderConfig(unit_id, volume, 512, compression=(CODEC_NONE,)), src)
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    client.start()
    progress_seen = 0
    try:
        deadline = time.monotonic() + timeout
        while src.last_verify is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"verify did not finish in {timeout} s")
            r = src.resync
            if r is not None and r["chunks_done"]:
                progress_seen += 1
            time.sleep(0.05)
        secs = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
    finally:
        client.stop()
        server.stop()
        src.close()
        vol.close()
        cbq.close()
        store.close()
    v = src.last_verify
    out: dict[str, Any] = {
        "volume_bytes": volume, "dense": dense, "seconds": round(secs, 2),
        "chunks_compared": v["chunks_compared"], "differing": len(v["differing_chunks"]),
        "progress_samples": progress_seen,
        "remote_on_own_medium": own_medium,
        # both ends' CPU; near os.cpu_count() x seconds, the machine's cores bound it
        "cpu_seconds": round(cpu, 2), "cpu_cores": os.cpu_count()}
    out["verify_mib_per_s"] = round(volume / MiB / secs, 1)
    if plain is not None:
        block = os.urandom(64 * MiB)
        t1 = time.perf_counter()
        for off in range(0, len(block), CHUNK):
            chunk_digest(memoryview(block)[off:off + CHUNK])
        # The floor of a dense verify here: each end hashes the whole volume once.
        out["digest_mib_per_s"] = round(64 / (time.perf_counter() - t1), 1)
        out["plain_read_mib_per_s"] = round(volume / MiB / plain, 1)
        out["plain_read_seconds"] = round(plain, 2)
        out["ratio_to_plain_read"] = round(secs / plain, 2)
        # Both ends share this machine's disk: each reads the volume once, so the
        # disk moves two volumes. On two units each end reads its own disk.
        assert paired is not None
        out["paired_read_seconds"] = round(paired, 2)
        out["ratio_to_paired_read"] = round(secs / paired, 2)
        out["goal"] = ("ratio_to_plain_read <= 1.1 (each end its own disk: the local's "
                       "read is the floor); with both ends on one disk, "
                       "ratio_to_paired_read <= 1.1")
    else:
        out["goal"] = "seconds < 60"
    return out


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
    print("Verify of a 200 GiB sparse volume ...")
    out["verify_sparse_200g"] = r = bench_verify(workdir / "verify-sparse", 200 << 30, False)
    print(f"  {r['seconds']} s for {r['chunks_compared']} chunks (goal < 60 s)")
    print("Verify of a dense 1 GiB volume, both ends' files on this machine's disk ...")
    out["verify_dense_1g"] = r = bench_verify(workdir / "verify-dense", 1 << 30, True)
    print(f"  {r['seconds']} s, one plain read {r['plain_read_seconds']} s: "
          f"{r['ratio_to_plain_read']}x; both ends' files read at once "
          f"{r['paired_read_seconds']} s: {r['ratio_to_paired_read']}x (goal <= 1.1x); "
          f"CPU {r['cpu_seconds']} s on {r['cpu_cores']} cores")
    shm = ram_disk(1 << 30)
    if shm is None:
        print("Verify of a dense 1 GiB volume, remote on its own medium: skipped "
              "(no RAM disk with 2 GiB free)")
    else:
        print("Verify of a dense 1 GiB volume, the remote's copy on a RAM disk (each end "
              "its own medium; the local's disk read is the floor) ...")
        out["verify_dense_1g_own_media"] = r = bench_verify(
            workdir / "verify-dense-own", 1 << 30, True, remote_dir=shm)
        print(f"  {r['seconds']} s, one plain read of the local's disk "
              f"{r['plain_read_seconds']} s: {r['ratio_to_plain_read']}x (goal <= 1.1x); "
              f"CPU {r['cpu_seconds']} s on {r['cpu_cores']} cores")
    return out


if __name__ == "__main__":
    import json

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(Path(d)), indent=2))
