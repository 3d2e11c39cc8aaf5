"""Several writers, the background committer and a power cut at a random moment."""

from __future__ import annotations

import random
import threading

from firmware.storage import CrashSimStorage, PowerCut, PowerRail
from firmware.volume import CacheMode
from tests.support.crashkit import BS, Geometry, new_unit, open_unit

WRITERS = 4


def _writer(vol, idx: int, blocks: int, seed: int, log: list, promised: dict,
            lock: threading.Lock, stop: threading.Event) -> None:
    """Each writer owns its own block range, so its writes are ordered per block."""
    rng = random.Random(seed)
    base = idx * blocks
    try:
        while not stop.is_set():
            lbn = base + rng.randrange(blocks - 2)
            n = rng.randrange(1, 3)
            data = rng.randbytes(n * BS)
            fua = rng.random() < 0.2
            log.append((lbn, data))  # issued (may or may not survive unless promised)
            vol.pwrite(lbn * BS, data, fua=fua)
            if fua:
                with lock:
                    promised[idx] = len(log)
            elif rng.random() < 0.1:
                vol.flush()
                with lock:
                    promised[idx] = len(log)
    except PowerCut:
        pass


def test_concurrent_writers_with_background_commits_survive_a_cut() -> None:
    total_checked = 0
    for seed in range(12):
        rng = random.Random(seed)
        geo = Geometry(volume_blocks=WRITERS * 32, cbq_bytes=3 * 4096 + 256 * 1024)
        rail = PowerRail()
        cbq_st, mirror_st = new_unit(geo, rail)
        q, vol = open_unit(cbq_st, mirror_st, CacheMode.WRITE_BACK)
        vol.flush_interval = 0.001
        vol.start()
        logs: list[list] = [[] for _ in range(WRITERS)]
        promised: dict[int, int] = {}
        lock = threading.Lock()
        stop = threading.Event()
        threads = [threading.Thread(target=_writer, args=(vol, i, 32, seed * 10 + i, logs[i],
                                                           promised, lock, stop))
                   for i in range(WRITERS)]
        for t in threads:
            t.start()
        # Cut the power after a random number of further write boundaries.
        rail.cut_after_writes = rail.ops + rng.randrange(20, 400)
        for t in threads:
            t.join(timeout=60)
        stop.set()
        vol._stop.set()
        vol._kick.set()
        assert rail.dead, "the workload ended before the cut"
        img_q = CrashSimStorage.from_image(bytes(cbq_st.crash_image(rng)))
        img_m = CrashSimStorage.from_image(bytes(mirror_st.crash_image(rng)))
        q2, vol2 = open_unit(img_q, img_m, CacheMode.WRITE_BACK)
        got = vol2.pread(0, geo.volume_blocks * BS)
        for i in range(WRITERS):
            upto = promised.get(i, 0)
            # A block whose last write was promised durable must hold exactly it.  A block
            # written again after the promise may hold either value, or a torn mix of the
            # two, as on any disk: only the ordering checks of the crash tests apply there.
            last: dict[int, tuple[int, bytes]] = {}
            for k, (lbn, data) in enumerate(logs[i]):
                for b in range(lbn, lbn + len(data) // BS):
                    last[b] = (k, data[(b - lbn) * BS:(b - lbn + 1) * BS])
            checked = 0
            for b, (k, chunk) in last.items():
                if k < upto:
                    checked += 1
                    assert got[b * BS:(b + 1) * BS] == chunk, \
                        f"seed {seed}: writer {i} block {b} lost a flushed write"
            total_checked += checked
        assert q2.verify()["clean"]
    assert total_checked > 100, "too few promised blocks to mean anything"


def test_pread_into_matches_pread_with_writes_still_in_the_cache(tmp_path) -> None:
    """A READ fills its reused buffer through pread_into: the mirror's bytes with
    the writes still in the RAM cache laid over them, as pread gives."""
    from firmware.cbq import CircularBufferQueue, create
    from firmware.storage import FileStorage
    from firmware.volume import Volume
    from tests.support.crashkit import Geometry

    geo = Geometry()
    for mirror in (FileStorage(tmp_path / "mirror.img", geo.volume_blocks * BS, create=True),
                   CrashSimStorage(geo.volume_blocks * BS, rail=PowerRail())):
        cbq_st = CrashSimStorage(geo.cbq_bytes, rail=PowerRail())
        create(cbq_st, volume_blocks=geo.volume_blocks, block_size=BS, chunk_size=geo.chunk,
               align=geo.align, consumers=("peer",))
        mirror.pwrite(0, bytes(range(256)) * (geo.volume_blocks * BS // 256))
        vol = Volume(mirror, CircularBufferQueue(cbq_st), cache_mode=CacheMode.WRITE_BACK,
                     cache_limit=64 * BS)
        vol.pwrite(3 * BS, b"\xaa" * (2 * BS))
        vol.pwrite(9 * BS, b"\xbb" * BS)
        buffer = bytearray(16 * BS)
        vol.pread_into(0, memoryview(buffer))
        assert bytes(buffer) == vol.pread(0, 16 * BS)
        assert buffer[3 * BS:5 * BS] == b"\xaa" * (2 * BS)
        assert buffer[9 * BS:10 * BS] == b"\xbb" * BS
        assert buffer[:BS] == bytes(range(256)) * 2
