"""Config slots with hostile bodies (found by fuzz/config_slot.py): a body with a text
string that is not UTF-8 made cbor2's C decoder leak ~650 bytes per read, so a unit
re-reading a damaged slot grew without bound; slots now go through the strict decoder."""

from __future__ import annotations

import gc
import tracemalloc

import cbor2

from firmware.config import Config
from firmware.config.store import SlotStatus, decode_slot, encode_slot

# {"ab": 1} with the key's bytes replaced by ff ff: a map whose key is not UTF-8.
NOT_UTF8 = bytes.fromhex("a162ffff01")


def test_a_body_with_text_that_is_not_utf8_is_reported_corrupt() -> None:
    info, cfg = decode_slot(0, encode_slot(3, NOT_UTF8), None)
    assert cfg is None and info.status is SlotStatus.CORRUPT and info.generation == 3
    assert "not CBOR" in info.reason and "UTF-8" in info.reason


def test_reading_such_a_slot_again_and_again_keeps_memory_flat() -> None:
    raw = encode_slot(3, NOT_UTF8)
    decode_slot(0, raw, None)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            decode_slot(0, raw, None)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # cbor2 5.6.5 kept ~650 bytes per read: ~2 MB here.
    assert grown < 200_000, f"{grown} bytes kept after 3000 reads"


def test_tags_in_a_slot_body_are_refused() -> None:
    doc = Config.defaults().to_document(include_secrets=True)
    doc["unit.name"] = cbor2.CBORTag(28, "shared")
    info, cfg = decode_slot(0, encode_slot(1, cbor2.dumps(doc)), None)
    assert cfg is None and info.status is SlotStatus.CORRUPT and "tag" in info.reason


def test_the_default_config_as_stored_still_loads() -> None:
    cfg = Config.defaults()
    body = cbor2.dumps(cfg.to_document(include_secrets=True), canonical=True)
    info, back = decode_slot(0, encode_slot(1, body), None)
    assert info.status is SlotStatus.VALID and back == cfg
