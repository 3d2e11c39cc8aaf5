"""Journey link: replicates the CBQ's numbered writes from a local unit to a remote one.

- `frames`: wire codec (length + CBOR map + CRC32C), sans-IO `FrameDecoder`.
- `session`: sans-IO `SenderSession` / `ReceiverSession` over the `WriteSource` /
  `WriteSink` protocols.
- `pacing`: sans-IO `TokenBucket` pacing the sender's WRITES and resync chunks.
- `tls`: unit identity (P-256, self-signed), pinned peers, TLS 1.3 contexts.
- `shell`: blocking TCP+TLS `LinkClient` / `LinkServer`.
- `memory`: in-memory source and sink.
"""
