"""Point-in-time images of a remote unit: export to a file, serve read-only over NBD
to real clients (nbdcopy, qemu-img, nbdinfo), rollback of the mirror itself."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.blockdev import BlockDevice, WriteProtected
from firmware.link.frames import WriteRecord
from firmware.nbd.server import NbdServer
from firmware.remote import (
    NotRestorable,
    OutsideRetention,
    PointInTimeDevice,
    Retention,
    StoreUsageError,
    UnitStore,
)

BS = 512
S = 1_000_000_000
T0 = 1_700_000_000 * S
MiB = 1 << 20
SIZE = 4 * MiB
BLOCKS = SIZE // BS


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: libnbd-bin / qemu-utils)")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def pattern(rng: random.Random, n: int, first_seq: int = 1, t0: int = T0) -> list[WriteRecord]:
    """Writes of 1-64 blocks, some hammering a hot region, ts 1 ms..2 s apart."""
    out, ts = [], t0
    for i in range(n):
        nb = rng.choice((1, 1, 8, 16, 64))
        if rng.random() < 0.4:
            lbn = rng.randrange(0, 256 - nb)  # hot region: many overwrites
        else:
            lbn = rng.randrange(0, BLOCKS - nb + 1)
        ts += rng.randint(1_000_000, 2 * S)
        out.append(WriteRecord(first_seq + i, lbn, rng.randbytes(nb * BS), ts))
    return out


def image(records: list[WriteRecord], base: bytes | None = None) -> bytes:
    img = bytearray(SIZE if base is None else base)
    for r in records:
        img[r.lbn * BS:r.lbn * BS + len(r.data)] = r.data
    return bytes(img)


def upto_ts(records: list[WriteRecord], t: int) -> list[WriteRecord]:
    return [r for r in records if r.ts <= t]


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[tuple[UnitStore, list[WriteRecord]]]:
    rng = random.Random(7)
    recs = pattern(rng, 400)
    u = UnitStore(str(tmp_path / "unit"), "exp", SIZE, BS, clock=FakeClock(),
                  segment_bytes=1 * MiB)
    for i in range(0, len(recs), 7):
        u.apply(recs[i:i + 7])
    yield u, recs
    u.close()


# --------------------------------------------------------------------------- export


def test_export_at_several_instants(unit: tuple[UnitStore, list[WriteRecord]],
                                    tmp_path: Path) -> None:
    u, recs = unit
    instants = [
        T0 - 1,                                  # before the first write
        recs[0].ts,                              # exactly the first write
        recs[99].ts + 1,                         # between writes
        (recs[199].ts + recs[200].ts) // 2,
        recs[333].ts,
        recs[-1].ts - 1,                         # just before the last one
        recs[-1].ts + 10 * S,                    # after everything: the mirror
    ]
    for t in instants:
        out = tmp_path / "img.raw"
        point = u.export(out, at=t)
        expect = upto_ts(recs, t)
        assert point.seq == (expect[-1].seq if expect else 0)
        data = out.read_bytes()
        assert len(data) == SIZE
        assert data == image(expect), t
    # By seq as well.
    out = tmp_path / "seq.raw"
    assert u.export(out, seq=250).seq == 250
    assert out.read_bytes() == image(recs[:250])
    # Zero runs stay holes: three writes touch at most three 64 KiB pieces each.
    assert u.export(out, seq=3).seq == 3
    assert out.read_bytes() == image(recs[:3])
    assert out.stat().st_blocks * 512 <= 3 * 2 * 64 * 1024
    # The mirror itself was never touched by any of this.
    assert u.read_mirror(0, SIZE) == image(recs)


def test_point_in_time_device_is_a_read_only_blockdevice(
        unit: tuple[UnitStore, list[WriteRecord]]) -> None:
    u, recs = unit
    with u.image_at_seq(120) as dev:
        assert isinstance(dev, BlockDevice)
        assert (dev.size, dev.block_size, dev.read_only) == (SIZE, BS, True)
        assert not dev.supports_trim and not dev.write_cache_enabled
        assert dev.changed_blocks > 0
        with pytest.raises(WriteProtected):
            dev.pwrite(0, b"x" * BS)
        with pytest.raises(WriteProtected):
            dev.trim(0, BS)
        expect = image(recs[:120])
        # Unaligned and block-straddling reads of every shape.
        rng = random.Random(3)
        for _ in range(300):
            off = rng.randrange(0, SIZE - 1)
            n = rng.randint(0, min(70_000, SIZE - off))
            assert dev.pread(off, n) == expect[off:off + n]


def test_view_keeps_its_point_while_writes_keep_arriving(
        unit: tuple[UnitStore, list[WriteRecord]]) -> None:
    u, recs = unit
    expect = image(recs[:200])
    more = pattern(random.Random(8), 200, first_seq=401, t0=recs[-1].ts)
    with u.image_at_seq(200) as dev:
        errors: list[str] = []

        def reader() -> None:
            rng = random.Random(9)
            for _ in range(400):
                off = rng.randrange(0, BLOCKS) * BS
                n = min(rng.choice((BS, 8 * BS, 64 * BS)), SIZE - off)
                if dev.pread(off, n) != expect[off:off + n]:
                    errors.append(f"mismatch at {off}+{n}")

        t = threading.Thread(target=reader)
        t.start()
        for i in range(0, len(more), 5):
            u.apply(more[i:i + 5])
        t.join()
        assert errors == []
        assert dev.pread(0, SIZE) == expect
    assert u.read_mirror(0, SIZE) == image(recs + more)


# --------------------------------------------------------------------------- NBD


@pytest.fixture
def served(unit: tuple[UnitStore, list[WriteRecord]]
           ) -> Iterator[tuple[str, PointInTimeDevice, bytes]]:
    u, recs = unit
    t = recs[260].ts
    dev = u.image_at(t)
    with NbdServer(dev, "127.0.0.1", 0, export_name="exp@260") as server:
        yield f"nbd://127.0.0.1:{server.port}/exp@260", dev, image(upto_ts(recs, t))
    dev.close()


def test_nbdcopy_reads_the_point_in_time_image(served: tuple[str, PointInTimeDevice, bytes],
                                               tmp_path: Path) -> None:
    need("nbdcopy")
    url, dev, expect = served
    out = tmp_path / "copy.raw"
    res = run("nbdcopy", url, str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == expect


def test_qemu_img_convert_reads_the_point_in_time_image(
        served: tuple[str, PointInTimeDevice, bytes], tmp_path: Path) -> None:
    need("qemu-img")
    url, dev, expect = served
    out = tmp_path / "conv.raw"
    res = run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == expect


def test_nbd_export_is_read_only(served: tuple[str, PointInTimeDevice, bytes],
                                 tmp_path: Path) -> None:
    need("nbdinfo")
    url, dev, expect = served
    res = run("nbdinfo", "--json", url)
    assert res.returncode == 0, res.stderr
    [exp] = json.loads(res.stdout)["exports"]
    assert exp["export-size"] == SIZE and exp["is_read_only"] is True
    if shutil.which("qemu-io"):
        res = run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4096", url)
        assert "Permission denied" in res.stdout + res.stderr or res.returncode != 0


# --------------------------------------------------------------------------- rollback


def test_rollback_rewinds_the_mirror_and_the_timeline(tmp_path: Path) -> None:
    rng = random.Random(11)
    recs = pattern(rng, 150)
    clock = FakeClock()
    u = UnitStore(str(tmp_path / "u"), "rb", SIZE, BS, clock=clock)
    u.apply(recs)
    t = recs[89].ts + 1
    view = u.image_at_seq(10)
    with pytest.raises(StoreUsageError, match="view"):
        u.rollback(to=t)
    view.close()
    rep = u.rollback(to=t)
    assert (rep.target.seq, rep.undone) == (90, 60)
    assert u.read_mirror(0, SIZE) == image(recs[:90])
    st = u.status()
    assert st.equal_to_local is False
    assert st.events[-1]["event"] == "rollback" and st.events[-1]["from_seq"] == 150
    # Undone seqs left the timeline; earlier points still rebuild exactly.
    with pytest.raises(NotRestorable, match="rollback"):
        u.image_at_seq(120)
    with u.image_at(recs[-1].ts) as dev:
        assert dev.point.seq == 90
    out = tmp_path / "at40.raw"
    u.export(out, seq=40)
    assert out.read_bytes() == image(recs[:40])
    # The link keeps going after the rollback: new seqs land on the rewound image.
    more = pattern(random.Random(12), 20, first_seq=151, t0=recs[-1].ts)
    u.apply(more)
    after = image(more, base=image(recs[:90]))
    assert u.read_mirror(0, SIZE) == after
    with u.image_at_seq(160) as dev:
        assert dev.pread(0, SIZE) == image(more[:10], base=image(recs[:90]))
    u.close()
    # ...and all of it survives a restart.
    u = UnitStore(str(tmp_path / "u"), "rb", SIZE, BS, clock=clock)
    assert u.read_mirror(0, SIZE) == after
    with u.image_at_seq(40) as dev:
        assert dev.pread(0, SIZE) == image(recs[:40])
    with pytest.raises(NotRestorable):
        u.image_at_seq(100)
    u.close()


def test_rollback_outside_retention_names_the_oldest_instant(tmp_path: Path) -> None:
    recs = pattern(random.Random(13), 100)
    clock = FakeClock()
    with UnitStore(str(tmp_path / "u"), "rr", SIZE, BS, clock=clock,
                   retention=Retention(max_bytes=256 * 1024)) as u:
        u.apply(recs)
        oldest = u.status().oldest_restorable_ns
        assert oldest > 0
        with pytest.raises(OutsideRetention, match="oldest restorable instant") as ei:
            u.rollback(to=recs[0].ts)
        assert ei.value.oldest_ns == oldest
        assert str(oldest) in str(ei.value)
        # Nothing changed.
        assert u.read_mirror(0, SIZE) == image(recs)
        assert u.status().equal_to_local is True


def test_rollback_drops_delayed_writes(tmp_path: Path) -> None:
    recs = pattern(random.Random(14), 60)
    clock = FakeClock(recs[0].ts)
    with UnitStore(str(tmp_path / "u"), "rd", SIZE, BS, clock=clock,
                   commit_delay_s=1) as u:
        u.apply(recs)
        u.apply_due(recs[39].ts + 1 * S)
        assert u.last_applied_seq == 40
        rep = u.rollback(to_seq=30)
        assert (rep.target.seq, rep.undone, rep.dropped_pending) == (30, 10, 20)
        u.apply_due(recs[-1].ts + 100 * S)
        assert u.read_mirror(0, SIZE) == image(recs[:30])
        assert u.status().pending_records == 0
