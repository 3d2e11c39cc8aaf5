"""The one grammar for addresses and fingerprints every command and the config read."""

from __future__ import annotations

import pytest

from firmware.config.errors import ConfigError
from firmware.config.fields import normalise_fingerprint
from firmware.config.fields import split_host_port as config_split
from firmware.link.tls import normalize_fingerprint
from firmware.local.replication import RemoteSpec
from firmware.units import (
    AddressError,
    FingerprintError,
    fingerprint_hex,
    join_host_port,
    split_host_port,
)

FP = "ab" * 32


@pytest.mark.parametrize(("text", "kwargs", "expected"), [
    ("host:80", {}, ("host", 80)),
    (" 10.0.0.1:7070 ", {}, ("10.0.0.1", 7070)),
    ("[::1]:9000", {}, ("::1", 9000)),
    ("[2001:db8::1]", {"default_port": 5}, ("2001:db8::1", 5)),
    ("example.org", {"default_port": 10809}, ("example.org", 10809)),
    (":5000", {"empty_host": True}, ("", 5000)),
    ("127.0.0.1:0", {}, ("127.0.0.1", 0)),
])
def test_split_host_port(text: str, kwargs: dict[str, object], expected: tuple[str, int]) -> None:
    assert split_host_port(text, **kwargs) == expected  # type: ignore[arg-type]
    host, port = expected
    if host:
        assert split_host_port(join_host_port(host, port)) == expected


@pytest.mark.parametrize("text", [
    "", "host", "host:", "host:abc", "host:70000", "::1:5", "[::1", "[]:5", "[::1]x", ":5",
])
def test_split_host_port_refuses(text: str) -> None:
    with pytest.raises(AddressError):
        split_host_port(text)


def test_the_callers_share_the_grammar() -> None:
    assert config_split("k", "[::1]:7070") == ("::1", 7070)
    assert RemoteSpec.parse("r=[::1]:7070") == RemoteSpec("r", "::1", 7070)
    for bad in ("::1:7070", "host:0"):
        with pytest.raises(ConfigError):
            config_split("k", bad)
    with pytest.raises(ValueError, match="NAME=HOST:PORT"):
        RemoteSpec.parse("r=2001:db8::1:7070")


@pytest.mark.parametrize("text", [
    FP, FP.upper(), ":".join(FP[i:i + 2] for i in range(0, 64, 2)), " " + FP + "\n",
])
def test_fingerprint_forms(text: str) -> None:
    assert fingerprint_hex(text) == FP
    assert normalise_fingerprint("k", text) == FP
    assert normalize_fingerprint(text).replace(":", "") == FP


@pytest.mark.parametrize("text", ["", "ab" * 31, "zz" * 32, FP + "00", "sha256=" + FP])
def test_fingerprint_refuses(text: str) -> None:
    with pytest.raises(FingerprintError):
        fingerprint_hex(text)
    with pytest.raises(ConfigError):
        normalise_fingerprint("k", text)


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("64K", 64 << 10), ("1.5G", 3 << 29), ("2TiB", 2 << 40), ("1p", 1 << 50),
    (" 512 MB ", 512 << 20), ("0.5K", 512),
])
def test_one_size_grammar(text: str, expected: int) -> None:
    from firmware.apps.options import size as cli_size
    from firmware.config.fields import parse_size as config_size
    from firmware.units import parse_size
    assert parse_size(text) == config_size(text) == cli_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "1.5", "0.1K", "-1", "1X", "1e3"])
def test_sizes_refused(text: str) -> None:
    from firmware.units import parse_size
    if text == "1.5":
        with pytest.raises(ValueError, match="whole number"):
            parse_size(text)
        return
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("n", [0, 1, 4097, 1536 << 10, 64 << 30, 3 << 40])
def test_exact_size_text_reads_back(n: int) -> None:
    from firmware.units import format_size_exact, parse_size
    assert parse_size(format_size_exact(n)) == n
