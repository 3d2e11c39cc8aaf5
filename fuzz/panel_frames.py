"""The front-panel link on the appliance side: the COBS frame decoder (delimiters, CRC32C,
version and type, the JSON payload) on any split of a byte stream, and every REQUEST it
accepts handled as the link's worker thread does (PanelActions.handle over a real config
store in memory and a fake unit), its REPLY encoded as the link sends it.

Nothing may escape: the decoder reports bad frames as BadFrame and handle() answers every
request with a reply (a refusal included); a reply the codec cannot encode would leave the
panel waiting, so that fails too.  A flag wraps the input as the payload of a frame
with a valid CRC (its type fuzzed as well), so the fuzzer reaches the JSON and the
actions instead of stopping at the checksum.  The admin password is checked with the real
Argon2id verifier at the smallest parameters it accepts (8 KiB, one pass): the full cost
would make each input take a second and say nothing more."""

from __future__ import annotations

import logging
from typing import Any

import atheris

with atheris.instrument_imports():
    from _common import MemorySlots, main
    from cobs import cobs

    from firmware.config import Config, ConfigStore, StoreSettings
    from firmware.config.kdf import Argon2Params, hash_password_text
    from firmware.control import ControlError
    from firmware.panel.actions import ActionSettings, PanelActions
    from firmware.panel.codec import (
        CRC,
        HEAD,
        VERSION,
        BadFrame,
        Frame,
        FrameDecoder,
        FrameType,
        encode_frame,
    )
    from firmware.panel.service import LinkSettings, PanelLink
    from firmware.record import crc32c
    from tests.support.status import consumer, local_status, peer

PIN = "7302951846"
SLOT_SIZE = 16 << 10
# Every refused request and bad frame logs a line; a million of them say nothing new.
logging.disable(logging.CRITICAL)


def _base_image() -> bytes:
    slots = MemorySlots()
    store = ConfigStore(StoreSettings("panel-cfg", slot_size=SLOT_SIZE), opener=slots.opener)
    cheap = Argon2Params(memory_kib=8, time_cost=1)
    store.save(Config.defaults().replace({"admin.password_hash":
                                          hash_password_text(PIN, cheap)}))
    return bytes(slots.image)


BASE = _base_image()


class FakeUnit:
    """The unit's control socket: the answers a running local gives, or refusals."""

    def __init__(self, mode: int) -> None:
        self.mode = mode

    def __call__(self, path: str, op: str, timeout: float = 0, **args: Any) -> Any:
        if self.mode == 0:
            raise ControlError(f"cannot reach the unit at {path}: Connection refused")
        if op == "status":
            st = local_status(fill=0.25, peers={"r1": peer("connected", "tls: bad cert")},
                              ups_flags="OB DISCHRG")
            st["cbq"]["consumers"] = {"r1": consumer(needs_resync=True)}
            if self.mode == 2:
                del st["link"]
            return st
        if self.mode == 3:
            raise ControlError(f"{op}: refused by the unit")
        if op == "volume.set_state":
            return args["state"]
        if op == "volume.flush":
            return 0.01
        if op == "link.switchover":
            return {"direction": "to-remote", "seq": 42}
        raise ControlError(f"unknown operation {op!r}")


def _wrap(ftype: int, payload: bytes) -> bytes:
    raw = HEAD.pack(VERSION, ftype) + payload
    return b"\x00" + cobs.encode(raw + CRC.pack(crc32c(raw))) + b"\x00"


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    # FuzzedDataProvider takes integers from the end and bytes from the front: a seed is
    # the stream (or payload) followed by step, unit, frame type and the wrap flag.
    wrap = fdp.ConsumeIntInRange(0, 1)
    ftype = fdp.ConsumeIntInRange(0, 5)
    unit = FakeUnit(fdp.ConsumeIntInRange(0, 3))
    step = fdp.ConsumeIntInRange(0, 255)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    stream = _wrap(ftype, rest) if wrap else rest
    step = step or len(stream) or 1
    slots = MemorySlots(BASE)
    store = ConfigStore(StoreSettings("panel-cfg", slot_size=SLOT_SIZE), opener=slots.opener)
    actions = PanelActions(ActionSettings(control="unit.sock", store=store,
                                          fingerprint="ab" * 32),
                           caller=unit, clock=lambda: 1000.0,
                           runner=lambda argv: None, switchover_wait_s=0.0)
    link = PanelLink(LinkSettings(device="panel-tty"), actions)
    decoder = FrameDecoder()
    for i in range(0, len(stream), step):
        for event in decoder.feed(stream[i:i + step]):
            if isinstance(event, BadFrame):
                continue
            assert isinstance(event, Frame) and isinstance(event.body, dict)
            if event.type is FrameType.REQUEST:
                reply = actions.handle(event.body)
                assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
                # What PanelLink._send does, minus the serial line.
                encode_frame(FrameType.REPLY, reply)
            else:
                link._on_frame(event)


if __name__ == "__main__":
    main("panel_frames", one_input)
