"""Tests for the key functions: peer address, forwarded headers, header keys."""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_guard._errors import ConfigurationError
from asgi_guard._keys import client_ip, header_key, peer_address

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.types import Scope

PROXY = "10.0.0.1"
TRUSTED = ["10.0.0.0/8"]
TEN = ipaddress.IPv4Network("10.0.0.0/8")
FD = ipaddress.IPv6Network("fd00::/8")

Header = tuple[str, "str | bytes"]


def make_scope(client: tuple[str, int] | None = (PROXY, 4711), *headers: Header) -> dict[str, Any]:
    """Build an HTTP scope; header names are lowercased and encoded like a server would."""
    raw = [
        (name.lower().encode("latin-1"), value if isinstance(value, bytes) else value.encode())
        for name, value in headers
    ]
    return {"type": "http", "client": client, "headers": raw}


def expected_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix: int = 64) -> str:
    """The key an address should get, computed independently of the implementation."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if isinstance(address, ipaddress.IPv4Address) or prefix == 128:
        return str(address)
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def is_ip_key(value: str) -> bool:
    """True for ``unknown``, an IP address, or an IPv6 network in CIDR form."""
    if value == "unknown":
        return True
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return True
    try:
        network = ipaddress.ip_network(value)
    except ValueError:
        return False
    return network.version == 6 and "/" in value


# -- the socket peer ---------------------------------------------------------------------------


def test_peer_is_the_default_key() -> None:
    """Without trusted proxies the key is the socket peer, whatever the headers say."""
    key = client_ip()
    scope = make_scope(("192.0.2.7", 1234), ("x-forwarded-for", "198.51.100.1"))
    assert key(scope) == "192.0.2.7", key(scope)


def test_peer_that_is_not_an_ip_is_kept() -> None:
    """A peer name that is not an address (Starlette's TestClient) is used as it is."""
    key = client_ip(trusted_proxies=TRUSTED)
    for host in ("testclient", "not:an:address"):
        result = key(make_scope((host, 50000), ("x-forwarded-for", "198.51.100.1")))
        assert result == host, result
        assert client_ip()(make_scope((host, 50000))) == host


@pytest.mark.parametrize("trusted", [[], TRUSTED])
def test_no_client_is_unknown_and_warns_once(
    caplog: pytest.LogCaptureFixture, trusted: list[str]
) -> None:
    """A scope without a client gets the shared key "unknown" and one warning per instance."""
    key = client_ip(trusted_proxies=trusted)
    scopes: list[dict[str, Any]] = [make_scope(None), {"type": "http"}, make_scope(("", 0))]
    with caplog.at_level(logging.WARNING, logger="asgi_guard"):
        results = [key(scope) for scope in scopes * 2]
    assert results == ["unknown"] * 6, results
    warnings = [r for r in caplog.records if r.name == "asgi_guard"]
    assert len(warnings) == 1, warnings
    assert warnings[0].levelno == logging.WARNING
    with caplog.at_level(logging.WARNING, logger="asgi_guard"):
        client_ip()(make_scope(None))
    assert len([r for r in caplog.records if r.name == "asgi_guard"]) == 2, caplog.records


@pytest.mark.parametrize(
    ("host", "prefix", "expected"),
    [
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::7", 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:0:0:0:7", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::7", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2::7", 128, "2001:db8:1:2::7"),
        ("2001:0db8:0001:0002:0000:0000:0000:0007", 128, "2001:db8:1:2::7"),
        ("2001:db8:1:2::7", 0, "::/0"),
        ("fe80::1%eth0", 128, "fe80::1"),
        ("::ffff:192.0.2.9", 64, "192.0.2.9"),
        ("::ffff:192.0.2.9", 128, "192.0.2.9"),
    ],
)
def test_ipv6_peer_is_grouped(host: str, prefix: int, expected: str) -> None:
    """IPv6 peers become their /prefix network; /128 keeps the address; mapped IPv4 is IPv4."""
    scope = make_scope((host, 443))
    assert client_ip(ipv6_prefix=prefix)(scope) == expected, client_ip(ipv6_prefix=prefix)(scope)
    assert peer_address(scope, prefix) == expected, peer_address(scope, prefix)


def test_same_ipv6_network_shares_a_key() -> None:
    """Two addresses of one /64 share a key; a neighbouring /64 does not."""
    key = client_ip()
    first = key(make_scope(("2001:db8:0:1::1", 1)))
    second = key(make_scope(("2001:db8:0:1:ffff::2", 1)))
    other = key(make_scope(("2001:db8:0:2::1", 1)))
    assert first == second != other, (first, second, other)


def test_peer_address() -> None:
    """peer_address returns the grouped peer, "unknown" without a client, and checks the prefix."""
    assert peer_address(make_scope(("192.0.2.1", 1))) == "192.0.2.1"
    assert peer_address(make_scope(None)) == "unknown"
    assert peer_address({"type": "http"}) == "unknown"
    assert peer_address(make_scope(("testclient", 1))) == "testclient"
    with pytest.raises(ConfigurationError, match="ipv6_prefix"):
        peer_address(make_scope(), 129)


# -- forwarded headers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        ("x-forwarded-for", "198.51.100.1"),
        ("forwarded", "for=198.51.100.1"),
        ("x-real-ip", "198.51.100.1"),
    ],
)
def test_untrusted_peer_ignores_forwarded_headers(header: Header) -> None:
    """Forwarded headers from a peer outside trusted_proxies are ignored."""
    key = client_ip(trusted_proxies=TRUSTED)
    result = key(make_scope(("192.0.2.7", 1), header))
    assert result == "192.0.2.7", result


def test_trusted_peer_without_headers_is_the_client() -> None:
    """A trusted peer that sends no forwarded header is itself the client."""
    key = client_ip(trusted_proxies=TRUSTED)
    assert key(make_scope((PROXY, 1), ("host", "example.com"))) == PROXY


@pytest.mark.parametrize(
    ("xff", "expected"),
    [
        ("203.0.113.5", "203.0.113.5"),
        ("198.51.100.1, 203.0.113.5, 10.0.0.3, 10.0.0.2", "203.0.113.5"),
        ("198.51.100.1,203.0.113.5", "203.0.113.5"),
        ("  198.51.100.1 ,\t203.0.113.5\t, 10.9.9.9  ", "203.0.113.5"),
        ("10.0.0.9, 10.0.0.3, 10.0.0.2", "10.0.0.9"),
        ("10.0.0.9", "10.0.0.9"),
    ],
)
def test_xff_is_walked_right_to_left(xff: str, expected: str) -> None:
    """The client is the rightmost untrusted XFF hop, or the leftmost if all are trusted."""
    key = client_ip(trusted_proxies=TRUSTED)
    result = key(make_scope((PROXY, 1), ("x-forwarded-for", xff)))
    assert result == expected, result


@pytest.mark.parametrize(
    ("xff", "expected"),
    [
        ("198.51.100.1, garbage, 10.0.0.3", "10.0.0.3"),
        ("198.51.100.1, unknown, 10.0.0.3, 10.0.0.2", "10.0.0.3"),
        ("198.51.100.1, _hidden, 10.0.0.3", "10.0.0.3"),
        ("198.51.100.1, , 10.0.0.3", "10.0.0.3"),
        ("198.51.100.1, 10.0.0.3, ", PROXY),
        ("garbage", PROXY),
        ("1.2.3.4.5, 10.0.0.3", "10.0.0.3"),
        ("001.002.003.004, 10.0.0.3", "10.0.0.3"),
        ("[2001:db8::1, 10.0.0.3", "10.0.0.3"),
        ("[2001:db8::1]x, 10.0.0.3", "10.0.0.3"),
        (b"198.51.100.1\xa0, 10.0.0.3", "10.0.0.3"),
        (b"198.51.100.1, \xc3\xa9, 10.0.0.3", "10.0.0.3"),
        (" , ", PROXY),
    ],
)
def test_xff_walk_stops_at_garbage(xff: str | bytes, expected: str) -> None:
    """An entry that is not an IP ends the walk at the nearest trusted hop (the peer if none)."""
    key = client_ip(trusted_proxies=TRUSTED)
    result = key(make_scope((PROXY, 1), ("x-forwarded-for", xff)))
    assert result == expected, result


@pytest.mark.parametrize(
    ("xff", "expected"),
    [
        ("203.0.113.5:5678, 10.0.0.2:80", "203.0.113.5"),
        ("[2001:db8:1:2::1]:443, 10.0.0.2", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2::1], 10.0.0.2", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.5", "203.0.113.5"),
        ("[::ffff:203.0.113.5]:80", "203.0.113.5"),
        ("203.0.113.5, ::ffff:10.0.0.7", "203.0.113.5"),
    ],
)
def test_xff_tolerates_ports_brackets_and_ipv6(xff: str, expected: str) -> None:
    """Ports and brackets are dropped; IPv6 hops are grouped and mapped IPv4 unwrapped."""
    key = client_ip(trusted_proxies=TRUSTED)
    result = key(make_scope((PROXY, 1), ("x-forwarded-for", xff)))
    assert result == expected, result


def test_multiple_xff_lines_are_concatenated() -> None:
    """Several X-Forwarded-For lines form one list, in order."""
    key = client_ip(trusted_proxies=TRUSTED)
    scope = make_scope(
        (PROXY, 1),
        ("x-forwarded-for", "198.51.100.1, 203.0.113.5"),
        ("x-forwarded-for", "10.0.0.3"),
        ("x-forwarded-for", "10.0.0.2"),
    )
    assert key(scope) == "203.0.113.5", key(scope)
    scope = make_scope(
        (PROXY, 1),
        ("x-forwarded-for", "10.0.0.3"),
        ("x-forwarded-for", "198.51.100.1, 203.0.113.5"),
    )
    assert key(scope) == "203.0.113.5", key(scope)


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        ("for=198.51.100.1", "198.51.100.1"),
        ('for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::/64"),
        ('for="[2001:db8:cafe::17]"', "2001:db8:cafe::/64"),
        ('for="198.51.100.1:4711"', "198.51.100.1"),
        ("FOR=198.51.100.1", "198.51.100.1"),
        ("For=198.51.100.1;Proto=https", "198.51.100.1"),
        ("for=198.51.100.1;proto=https;by=10.0.0.1;host=example.com", "198.51.100.1"),
        ("proto=https; for = 198.51.100.1 ;by=_proxy", "198.51.100.1"),
        ("for=198.51.100.1, for=203.0.113.5, for=10.0.0.2", "203.0.113.5"),
        ("for=198.51.100.1, for=10.0.0.3, for=10.0.0.2", "198.51.100.1"),
        ("for=10.0.0.4, for=10.0.0.3", "10.0.0.4"),
        ("for=198.51.100.1, for=_hidden, for=10.0.0.3", "10.0.0.3"),
        ("for=198.51.100.1, for=unknown, for=10.0.0.3", "10.0.0.3"),
        ('for=198.51.100.1, for="_SEVKISEK", for=10.0.0.3', "10.0.0.3"),
        ("for=198.51.100.1, proto=https, for=10.0.0.3", "10.0.0.3"),
        ("for=_hidden", PROXY),
        ("for=", PROXY),
        ('for="', PROXY),
        ('for=198.51.100.1;by="a,b", for=10.0.0.3', "198.51.100.1"),
        ('for=198.51.100.1;host="a,b,c", for=10.0.0.3', "198.51.100.1"),
        ('for=192.0.2.9;host="x;for=6.6.6.6", for=10.0.0.3', "192.0.2.9"),
        ('for=192.0.2.9;host="a\\"b,c", for=10.0.0.3', "192.0.2.9"),
        # A client's quote left open does not swallow the element its proxy appended.
        ('for=6.6.6.6;host="open, for=192.0.2.9', "192.0.2.9"),
        ('for=6.6.6.6;host="open\\, for=192.0.2.9', "192.0.2.9"),
        ('for=6.6.6.6;host="x, for="[2001:db8::1]:4711"', "2001:db8::/64"),
    ],
)
def test_forwarded_header(forwarded: str, expected: str) -> None:
    """RFC 7239 for= values are read right to left: quoted, bracketed, obfuscated, any case."""
    key = client_ip(trusted_proxies=TRUSTED, headers=["forwarded"])
    result = key(make_scope((PROXY, 1), ("forwarded", forwarded)))
    assert result == expected, result


def test_multiple_forwarded_lines_are_concatenated() -> None:
    """Several Forwarded lines form one list of elements, in order."""
    key = client_ip(trusted_proxies=TRUSTED, headers=["forwarded"])
    scope = make_scope(
        (PROXY, 1),
        ("forwarded", "for=198.51.100.1"),
        ("forwarded", "for=10.0.0.3;proto=https"),
    )
    assert key(scope) == "198.51.100.1", key(scope)


@pytest.mark.parametrize(
    ("real_ip", "expected"),
    [
        ("198.51.100.1", "198.51.100.1"),
        (" 198.51.100.1 ", "198.51.100.1"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
        ("10.0.0.3", "10.0.0.3"),
        ("garbage", PROXY),
    ],
)
def test_x_real_ip(real_ip: str, expected: str) -> None:
    """X-Real-IP from a trusted proxy is the client."""
    key = client_ip(trusted_proxies=TRUSTED, headers=["x-real-ip"])
    result = key(make_scope((PROXY, 1), ("x-real-ip", real_ip)))
    assert result == expected, result


ALL_THREE: tuple[Header, ...] = (
    ("x-real-ip", "192.0.2.3"),
    ("x-forwarded-for", "192.0.2.2"),
    ("forwarded", "for=192.0.2.1"),
)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (("forwarded", "x-forwarded-for", "x-real-ip"), "192.0.2.1"),
        (("x-forwarded-for", "forwarded", "x-real-ip"), "192.0.2.2"),
        (("x-real-ip", "x-forwarded-for"), "192.0.2.3"),
        (("X-Real-IP",), "192.0.2.3"),
        (("x-forwarded-for", "x-forwarded-for"), "192.0.2.2"),
        ((), PROXY),
    ],
)
def test_header_precedence(headers: tuple[str, ...], expected: str) -> None:
    """The first configured header present wins, whatever the order in the request."""
    key = client_ip(trusted_proxies=TRUSTED, headers=headers)
    result = key(make_scope((PROXY, 1), *ALL_THREE))
    assert result == expected, result


def test_unlisted_and_blank_headers_are_skipped() -> None:
    """A header not in `headers` is never read; a blank one counts as absent."""
    key = client_ip(trusted_proxies=TRUSTED, headers=["forwarded", "x-real-ip"])
    result = key(make_scope((PROXY, 1), ("x-forwarded-for", "192.0.2.2")))
    assert result == PROXY, result
    result = key(make_scope((PROXY, 1), ("forwarded", "  "), ("x-real-ip", "192.0.2.3")))
    assert result == "192.0.2.3", result


def test_uppercase_header_names_in_scope_are_matched() -> None:
    """Header names are matched case-insensitively even if a server forgot to lowercase them."""
    key = client_ip(trusted_proxies=TRUSTED)
    scope: dict[str, Any] = {
        "type": "http",
        "client": (PROXY, 1),
        "headers": [(b"X-Forwarded-For", b"192.0.2.2")],
    }
    assert key(scope) == "192.0.2.2", key(scope)


@pytest.mark.parametrize(
    ("peer", "trusted", "expected"),
    [
        ("::ffff:10.0.0.1", ["10.0.0.0/8"], "192.0.2.2"),
        ("10.0.0.1", ["::ffff:10.0.0.0/104"], "192.0.2.2"),
        ("::1", ["::1"], "192.0.2.2"),
        ("2001:db8::5", ["2001:db8::/32"], "192.0.2.2"),
        ("0.0.0.1", ["::1"], "0.0.0.1"),
        ("::1", ["0.0.0.1"], "::/64"),
        ("127.0.0.1", ["127.0.0.1"], "192.0.2.2"),
        ("127.0.0.2", ["127.0.0.1"], "127.0.0.2"),
    ],
)
def test_trust_matching(peer: str, trusted: list[str], expected: str) -> None:
    """Trust is matched per IP version, with IPv4-mapped peers and networks treated as IPv4."""
    key = client_ip(trusted_proxies=trusted)
    result = key(make_scope((peer, 1), ("x-forwarded-for", "192.0.2.2")))
    assert result == expected, result


def test_ipv6_prefix_applies_to_forwarded_clients() -> None:
    """A forwarded IPv6 client is grouped by the configured prefix."""
    scope = make_scope((PROXY, 1), ("x-forwarded-for", "2001:db8:1:2:3::9"))
    assert client_ip(trusted_proxies=TRUSTED, ipv6_prefix=128)(scope) == "2001:db8:1:2:3::9"
    assert client_ip(trusted_proxies=TRUSTED, ipv6_prefix=56)(scope) == "2001:db8:1::/56"


def test_hops_beyond_the_cap_are_not_examined() -> None:
    """Only the rightmost 64 hops are examined; an all-trusted window yields its leftmost hop."""
    key = client_ip(trusted_proxies=TRUSTED)
    hops = ["198.51.100.1"] + [f"10.0.{i}.1" for i in range(100)]
    result = key(make_scope((PROXY, 1), ("x-forwarded-for", ", ".join(hops))))
    assert result == hops[-64], result
    hops = ["198.51.100.1"] + [f"10.0.{i}.1" for i in range(63)]
    result = key(make_scope((PROXY, 1), ("x-forwarded-for", ", ".join(hops))))
    assert result == "198.51.100.1", result


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-forwarded-for", b"198.51.100.1," * 100_000 + b"203.0.113.5, 10.0.0.2"),
        ("x-forwarded-for", b"9" * 1_000_000 + b", 203.0.113.5"),
        ("x-forwarded-for", b"\xff" * 1_000_000),
        ("forwarded", b"for=198.51.100.1;" * 60_000 + b"by=x, for=203.0.113.5"),
        ("forwarded", b'for="' + b"a" * 1_000_000),
        ("x-real-ip", b"1" * 1_000_000),
    ],
)
def test_huge_headers_are_cheap(name: str, value: bytes) -> None:
    """A megabyte of forwarded header is handled without error and quickly."""
    key = client_ip(trusted_proxies=TRUSTED)
    scope = make_scope((PROXY, 1), (name, value))
    start = time.perf_counter()
    result = key(scope)
    elapsed = time.perf_counter() - start
    assert result in {"203.0.113.5", PROXY}, result
    assert elapsed < 0.25, elapsed


# -- configuration errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"trusted_proxies": ["10.0.0.0/33"]}, "10.0.0.0/33"),
        ({"trusted_proxies": ["not-an-ip"]}, "not-an-ip"),
        ({"trusted_proxies": ["10.0.0.1/8"]}, "10.0.0.1/8"),
        ({"trusted_proxies": [""]}, "trusted_proxies"),
        ({"trusted_proxies": "10.0.0.0/8"}, "list"),
        ({"ipv6_prefix": -1}, "ipv6_prefix"),
        ({"ipv6_prefix": 129}, "ipv6_prefix"),
        ({"ipv6_prefix": True}, "ipv6_prefix"),
        ({"ipv6_prefix": "64"}, "ipv6_prefix"),
        ({"headers": ["x-client-ip"]}, "x-client-ip"),
        ({"headers": ["forwarded", ""]}, "empty"),
        ({"headers": "forwarded"}, "sequence"),
    ],
)
def test_client_ip_configuration_errors(options: dict[str, Any], match: str) -> None:
    """Bad proxies, prefixes and header names raise ConfigurationError at construction."""
    with pytest.raises(ConfigurationError, match=match):
        client_ip(**options)


def test_configuration_error_is_a_value_error() -> None:
    """ConfigurationError can be caught as ValueError."""
    with pytest.raises(ValueError, match="ipv6_prefix"):
        client_ip(ipv6_prefix=200)


# -- header_key --------------------------------------------------------------------------------


def test_header_key_reads_the_first_occurrence() -> None:
    """The key is the first occurrence of the header, stripped, matched case-insensitively."""
    key = header_key("X-API-Key")
    scope = make_scope(("192.0.2.1", 1), ("x-api-key", "  k1 "), ("x-api-key", "k2"))
    assert key(scope) == "x-api-key=k1", key(scope)
    scope = {"type": "http", "client": ("192.0.2.1", 1), "headers": [(b"X-Api-Key", b"k3")]}
    assert key(scope) == "x-api-key=k3", key(scope)


def test_header_key_decodes_latin1() -> None:
    """Non-ASCII header bytes are decoded as latin-1 instead of failing."""
    key = header_key("x-api-key")
    result = key(make_scope(("192.0.2.1", 1), ("x-api-key", b"caf\xe9\xff")))
    assert result == "x-api-key=caf\xe9\xff", result


@pytest.mark.parametrize("headers", [(), (("x-api-key", ""),), (("x-api-key", "  "),)])
def test_header_key_falls_back_to_the_peer(headers: tuple[Header, ...]) -> None:
    """A missing or empty header falls back to the grouped socket peer."""
    key = header_key("x-api-key")
    assert key(make_scope(("192.0.2.1", 1), *headers)) == "192.0.2.1"
    assert key(make_scope(("2001:db8:1:2::1", 1), *headers)) == "2001:db8:1:2::/64"
    assert key(make_scope(None, *headers)) == "unknown"


def test_header_key_sync_fallback() -> None:
    """A sync fallback is called only when the header is missing, and the result stays sync."""
    calls: list[str] = []

    def fallback(scope: Scope) -> str:
        calls.append("called")
        return "fallback"

    key = header_key("x-api-key", fallback=fallback)
    assert key(make_scope(("192.0.2.1", 1), ("x-api-key", "k1"))) == "x-api-key=k1"
    assert calls == [], calls
    assert key(make_scope(("192.0.2.1", 1))) == "fallback"
    assert calls == ["called"], calls
    chained = header_key("x-tenant", fallback=header_key("x-api-key"))
    assert chained(make_scope(("192.0.2.1", 1), ("x-api-key", "k1"))) == "x-api-key=k1"


def test_header_key_hashes_long_values() -> None:
    """Values over 256 characters become a fixed-size digest; shorter ones are kept."""
    key = header_key("x-api-key")
    kept = "a" * 256
    assert key(make_scope(("192.0.2.1", 1), ("x-api-key", kept))) == "x-api-key=" + kept
    first = key(make_scope(("192.0.2.1", 1), ("x-api-key", "a" * 257)))
    again = key(make_scope(("192.0.2.1", 1), ("x-api-key", " " + "a" * 257)))
    other = key(make_scope(("192.0.2.1", 1), ("x-api-key", "b" * 1_000_000)))
    assert isinstance(first, str), first
    assert isinstance(other, str), other
    assert first.startswith("x-api-key#"), first
    assert len(first) == len("x-api-key#") + 32, first
    assert first == again != other, (first, again, other)
    assert len(other) == len(first), other


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_header_key_async_fallback(backend: str) -> None:
    """An async fallback makes the key function async; it is awaited only when needed."""

    async def fallback(scope: Scope) -> str:
        await anyio.lowlevel.checkpoint()
        return "async-fallback"

    key = header_key("x-api-key", fallback=fallback)

    async def run(scope: dict[str, Any]) -> str:
        result = key(scope)
        assert not isinstance(result, str), result
        return await result

    missing = anyio.run(run, make_scope(("192.0.2.1", 1)), backend=backend)
    assert missing == "async-fallback", missing
    present = anyio.run(run, make_scope(("192.0.2.1", 1), ("x-api-key", "k1")), backend=backend)
    assert present == "x-api-key=k1", present


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_header_key_detects_async_callables(backend: str) -> None:
    """An instance with async __call__ or a partial of an async function counts as async."""

    class Fallback:
        async def __call__(self, scope: Scope, suffix: str = "") -> str:
            return "instance" + suffix

    fallbacks: list[Callable[[Scope], Awaitable[str]]] = [
        Fallback(),
        functools.partial(Fallback().__call__, suffix="-partial"),
    ]
    for fallback, expected in zip(fallbacks, ["instance", "instance-partial"], strict=True):
        key = header_key("x-api-key", fallback=fallback)

        async def run(key: Callable[[Scope], str | Awaitable[str]] = key) -> str:
            result = key(make_scope(("192.0.2.1", 1)))
            assert not isinstance(result, str), result
            return await result

        assert anyio.run(run, backend=backend) == expected


@pytest.mark.parametrize("name", ["", "   ", "x api key", "x-api-key:", "clé"])
def test_header_key_configuration_errors(name: str) -> None:
    """An empty or malformed header name raises ConfigurationError."""
    with pytest.raises(ConfigurationError, match="header"):
        header_key(name)


# -- properties --------------------------------------------------------------------------------

TOKENS = ["for=", "FOR=", '"', "[", "]", ":", ",", ";", " ", "=", "unknown", "_x", "\t", "%"]
ip_text = st.ip_addresses().map(str)
header_values = st.one_of(
    st.binary(max_size=512),
    st.text(max_size=256).map(lambda text: text.encode("utf-8")),
    st.lists(st.one_of(st.sampled_from(TOKENS), ip_text), max_size=40).map(
        lambda parts: "".join(parts).encode()
    ),
    st.tuples(st.binary(min_size=1, max_size=32), st.integers(1, 40_000)).map(
        lambda pair: pair[0] * pair[1]
    ),
)


@settings(deadline=None)
@given(
    name=st.sampled_from(["x-forwarded-for", "forwarded", "x-real-ip"]),
    values=st.lists(header_values, min_size=1, max_size=3),
    peer=st.sampled_from([PROXY, "10.255.0.1", "::ffff:10.1.2.3", "192.0.2.1"]),
)
def test_arbitrary_headers_never_raise(name: str, values: list[bytes], peer: str) -> None:
    """Whatever bytes the forwarded headers hold, the key is an IP, an IPv6 network or unknown."""
    key = client_ip(trusted_proxies=TRUSTED)
    scope = make_scope((peer, 1), *[(name, value) for value in values])
    result = key(scope)
    assert is_ip_key(result), result


trusted_hops = st.one_of(
    st.integers(0, 2**24 - 1).map(lambda n: ipaddress.IPv4Address((10 << 24) | n)),
    st.integers(0, 2**120 - 1).map(lambda n: ipaddress.IPv6Address((0xFD << 120) | n)),
)


def is_trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is inside 10.0.0.0/8 or fd00::/8, mapped IPv4 counted as IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address in TEN if isinstance(address, ipaddress.IPv4Address) else address in FD


untrusted_hops = st.ip_addresses().filter(lambda address: not is_trusted(address))


def render(address: ipaddress.IPv4Address | ipaddress.IPv6Address, header: str, style: int) -> str:
    """Write an address as a proxy might: bare, with a port, bracketed or quoted."""
    text = str(address)
    if address.version == 6 and style:
        text = f"[{text}]:{style}" if style % 2 else f"[{text}]"
    elif style % 2:
        text = f"{text}:{style}"
    if header == "forwarded":
        name = "For" if style % 3 else "for"
        return f'{name}="{text}"' if address.version == 6 or style % 2 else f"{name}={text}"
    return text


@given(
    chain_prefix=st.lists(st.ip_addresses(), max_size=5),
    client=untrusted_hops,
    suffix=st.lists(trusted_hops, max_size=20),
    header=st.sampled_from(["x-forwarded-for", "forwarded"]),
    styles=st.lists(st.integers(0, 65535), min_size=26, max_size=26),
)
def test_rightmost_untrusted_hop_is_the_client(
    chain_prefix: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    client: ipaddress.IPv4Address | ipaddress.IPv6Address,
    suffix: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    header: str,
    styles: list[int],
) -> None:
    """Behind a chain of trusted proxies, the client is the rightmost untrusted address."""
    key = client_ip(trusted_proxies=["10.0.0.0/8", "fd00::/8"], headers=[header])
    chain = [*chain_prefix, client, *suffix]
    value = ", ".join(render(a, header, s) for a, s in zip(chain, styles, strict=False))
    result = key(make_scope((PROXY, 1), (header, value)))
    assert result == expected_key(client), (result, value)


def test_header_values_cannot_pose_as_client_addresses() -> None:
    """A header value equal to some client's IP is a different key from that client's address."""
    key = header_key("x-api-key")
    spoof = key(make_scope(("192.0.2.1", 1), ("x-api-key", "198.51.100.7")))
    victim = key(make_scope(("198.51.100.7", 1)))
    assert spoof != victim, (spoof, victim)


def test_default_reads_only_x_forwarded_for() -> None:
    """Behind a proxy that appends to X-Forwarded-For and passes other headers through, a
    client's own Forwarded or X-Real-IP header cannot choose its key."""
    key = client_ip(trusted_proxies=TRUSTED)
    scope = make_scope(
        (PROXY, 1),
        ("forwarded", "for=6.6.6.6"),
        ("x-real-ip", "7.7.7.7"),
        ("x-forwarded-for", "203.0.113.7"),
    )
    assert key(scope) == "203.0.113.7", key(scope)
    assert key(make_scope((PROXY, 1), ("forwarded", "for=6.6.6.6"))) == PROXY


def test_forwarded_value_is_split_from_its_end_only() -> None:
    """A huge Forwarded value with quotes is split from its last 8 KiB: the hops the
    proxies appended are read, and what is cut at that edge ends the walk."""
    key = client_ip(trusted_proxies=TRUSTED, headers=["forwarded"])
    junk = ", ".join(f'for=198.51.100.{i % 200};host="a,{i}"' for i in range(2000))
    value = f'{junk}, for=192.0.2.9;host="h,1", for=10.0.0.3'
    assert len(value) > 20_000
    assert key(make_scope((PROXY, 1), ("forwarded", value))) == "192.0.2.9"
    # Every hop trusted back to the cut: the walk stops at the last trusted one it read.
    trusted = ", ".join(f'for=10.0.{i // 250}.{i % 250};host="a,b"' for i in range(400))
    assert key(make_scope((PROXY, 1), ("forwarded", trusted))).startswith("10.0.")
