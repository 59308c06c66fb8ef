"""Key functions: who is making this request, as a short string a store can count by."""

from __future__ import annotations

import functools
import hashlib
import inspect
import ipaddress
import logging
import re
import string
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeAlias, overload

from starlette.types import Scope

from asgi_guard._errors import ConfigurationError

__all__ = ["KeyFunc", "client_ip", "header_key", "peer_address"]

KeyFunc: TypeAlias = Callable[[Scope], "str | Awaitable[str]"]
"""A key function: takes the ASGI scope, returns the client's key (or an awaitable of it)."""

logger = logging.getLogger("asgi_guard")

_UNKNOWN = "unknown"
_FORWARDED_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
# Only the rightmost hops can come from trusted proxies; the rest is whatever the client sent.
_MAX_HOPS = 64
# Longer than any address literal with brackets, port and zone id: skip parsing (and caching) it.
_MAX_NODE_CHARS = 128
_MAX_FORWARDED_ELEMENT = 1024
# How much of a Forwarded value with quoted strings is split (the rest is left of 64 hops).
_MAX_QUOTED_SCAN = 8192
_MAX_HEADER_KEY_CHARS = 256
_CACHE_SIZE = 4096
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters)

_IPAddress: TypeAlias = "ipaddress.IPv4Address | ipaddress.IPv6Address"
_Hop: TypeAlias = "tuple[str, bool]"


def _parse_ip(text: str) -> _IPAddress | None:
    """Parse an address literal; IPv4-mapped IPv6 becomes IPv4 and zone ids are dropped."""
    if len(text) > _MAX_NODE_CHARS or not text.isascii():
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(address.packed)
    return address


def _v6_key(address: ipaddress.IPv6Address, ipv6_prefix: int) -> str:
    if ipv6_prefix == 128:
        return str(address)
    mask = ((1 << ipv6_prefix) - 1) << (128 - ipv6_prefix)
    return f"{ipaddress.IPv6Address(int(address) & mask)}/{ipv6_prefix}"


def _address_key(address: _IPAddress, ipv6_prefix: int) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        return _v6_key(address, ipv6_prefix)
    return str(address)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _key_for(text: str, ipv6_prefix: int) -> str | None:
    """Return the key of an address literal, or ``None`` when ``text`` is not one."""
    address = _parse_ip(text)
    return None if address is None else _address_key(address, ipv6_prefix)


def _check_prefix(ipv6_prefix: int) -> None:
    if isinstance(ipv6_prefix, bool) or not isinstance(ipv6_prefix, int):
        raise ConfigurationError(f"ipv6_prefix must be an int, got {ipv6_prefix!r}")
    if not 0 <= ipv6_prefix <= 128:
        raise ConfigurationError(f"ipv6_prefix must be between 0 and 128, got {ipv6_prefix}")


def peer_address(scope: Scope, ipv6_prefix: int = 64) -> str:
    """Return the socket peer of a request, with IPv6 grouped by network.

    IPv6 peers become their ``/ipv6_prefix`` network (``"2001:db8:1:2::/64"``), or the plain
    address when the prefix is 128; IPv4-mapped IPv6 becomes the IPv4 address. A peer that is
    not an IP address (a test client's name) is returned as it is. Without a client in the
    scope the result is ``"unknown"``, one key shared by all such requests.

    Args:
        scope: The ASGI connection scope.
        ipv6_prefix: Prefix length IPv6 peers are grouped by, 0 to 128.

    Returns:
        The peer's key.

    Raises:
        ConfigurationError: If ``ipv6_prefix`` is outside 0..128.

    Examples:
        >>> peer_address({"type": "http", "client": ("2001:db8:1:2::7", 5000)})
        '2001:db8:1:2::/64'
    """
    _check_prefix(ipv6_prefix)
    client = scope.get("client")
    if not client:
        return _UNKNOWN
    host: str = client[0]
    if not host:
        return _UNKNOWN
    if ":" not in host:
        return host
    return _key_for(host, ipv6_prefix) or host


def _peer_key_func(ipv6_prefix: int) -> Callable[[Scope], str]:
    """Build the fast peer key function, which warns once when a scope has no client."""
    warned = False

    def no_client() -> str:
        nonlocal warned
        if not warned:
            warned = True
            logger.warning(
                "request scope has no client address; such requests share the key %r",
                _UNKNOWN,
            )
        return _UNKNOWN

    def peer_key(scope: Scope) -> str:
        client = scope.get("client")
        if client:
            host: str = client[0]
            if ":" not in host:
                if host:
                    return host
            else:
                return _key_for(host, ipv6_prefix) or host
        return no_client()

    return peer_key


def _split_port(text: str) -> str | None:
    """Drop brackets and a port from a node: ``[2001:db8::1]:443`` and ``1.2.3.4:80``."""
    if text.startswith("["):
        end = text.find("]")
        if end == -1 or (end + 1 < len(text) and text[end + 1] != ":"):
            return None
        return text[1:end].strip(" \t")
    if text.count(":") == 1:
        return text.partition(":")[0]
    return text


def _xff_node(entry: bytes) -> str | None:
    entry = entry.strip()
    if not entry or len(entry) > _MAX_NODE_CHARS:
        return None
    return _split_port(entry.decode("latin-1"))


# Runs of anything but the separator and quotes, and quoted strings (RFC 9110, with
# backslash escapes). Matched from a separator, it stops at the next separator outside
# quotes, at the end, or at a quote left open.
_UNTIL_COMMA = re.compile(rb'(?:[^,"]+|"(?:[^"\\]|\\.)*")*', re.DOTALL)
_UNTIL_SEMICOLON = re.compile(rb'(?:[^;"]+|"(?:[^"\\]|\\.)*")*', re.DOTALL)


def _split_quoted(value: bytes, until: re.Pattern[bytes]) -> list[bytes] | None:
    """Split ``value`` at the separator ``until`` stops at, outside quoted strings; ``None``
    if a quote is left open."""
    parts: list[bytes] = []
    start, size = 0, len(value)
    while True:
        end = until.match(value, start).end()  # type: ignore[union-attr] # matches empty
        parts.append(value[start:end])
        if end >= size:
            return parts
        if value[end] == 0x22:  # '"'
            return None
        start = end + 1


def _forwarded_elements(value: bytes) -> list[bytes]:
    """The last `_MAX_HOPS` elements of a ``Forwarded`` value, split at commas outside
    quoted strings (``for=192.0.2.7;host="a,b"`` is one element)."""
    if b'"' in value:
        # Scanned from its last `_MAX_QUOTED_SCAN` bytes only, whatever its length: an
        # element cut at that edge is not an address, and the walk stops there.
        parts = _split_quoted(value[-_MAX_QUOTED_SCAN:], _UNTIL_COMMA)
        if parts is not None:
            return parts[-_MAX_HOPS:]
        # A quote left open: a client's, which would run on over the elements the proxies
        # appended after it. Split at every comma, as if there were no quotes.
    return _rightmost(value)


def _rightmost(value: bytes) -> list[bytes]:
    """The last `_MAX_HOPS` comma-separated entries of a list header."""
    entries = value.rsplit(b",", _MAX_HOPS)
    if len(entries) > _MAX_HOPS:
        del entries[0]
    return entries


def _forwarded_node(element: bytes) -> str | None:
    if len(element) > _MAX_FORWARDED_ELEMENT:
        return None
    pairs = _split_quoted(element, _UNTIL_SEMICOLON) if b'"' in element else None
    for pair in element.split(b";") if pairs is None else pairs:
        name, equals, value = pair.partition(b"=")
        if equals and name.strip().lower() == b"for":
            value = value.strip()
            if len(value) >= 2 and value.startswith(b'"') and value.endswith(b'"'):
                value = value[1:-1]
            return _xff_node(value)
    return None


#: For each forwarded header: how to split its value into hops, and how to read a hop.
_NODE_PARSERS: dict[bytes, tuple[Callable[[bytes], list[bytes]], Callable[[bytes], str | None]]] = {
    b"forwarded": (_forwarded_elements, _forwarded_node),
    b"x-forwarded-for": (_rightmost, _xff_node),
    b"x-real-ip": (_rightmost, _xff_node),
}


def _trusted_networks(
    trusted_proxies: Iterable[str],
) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """Compile CIDRs into ``(network, mask)`` integer pairs, IPv4 and IPv6 kept apart."""
    if isinstance(trusted_proxies, (str, bytes)):
        raise ConfigurationError(
            f"trusted_proxies must be a list of addresses or networks, got the string "
            f"{trusted_proxies!r}; write [{trusted_proxies!r}]"
        )
    if not isinstance(trusted_proxies, Iterable):
        raise ConfigurationError(
            f"trusted_proxies must be a list of addresses or networks, got "
            f"{type(trusted_proxies).__name__}"
        )
    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    mapped_space = ipaddress.IPv6Network("::ffff:0:0/96")
    for entry in trusted_proxies:
        try:
            network = ipaddress.ip_network(entry.strip() if isinstance(entry, str) else entry)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"trusted_proxies: {entry!r} is not an IP address or network "
                f"(like '10.0.0.0/8' or '::1'): {exc}"
            ) from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(mapped_space):
            # Peers are matched after IPv4-mapped addresses become IPv4, so match these as IPv4.
            network = ipaddress.IPv4Network(
                (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
            )
        pair = (int(network.network_address), int(network.netmask))
        (v4 if network.version == 4 else v6).append(pair)
    return tuple(v4), tuple(v6)


def _check_headers(headers: Sequence[str]) -> tuple[bytes, ...]:
    if isinstance(headers, (str, bytes)):
        raise ConfigurationError(
            f"headers must be a sequence of header names, got the string {headers!r}; "
            f"write [{headers!r}]"
        )
    if not isinstance(headers, Iterable):
        raise ConfigurationError(
            f"headers must be a sequence of header names, got {type(headers).__name__}"
        )
    names: list[bytes] = []
    for header in headers:
        if not isinstance(header, str):
            raise ConfigurationError(f"headers: header names must be strings, got {header!r}")
        name = header.strip().lower()
        if not name:
            raise ConfigurationError("headers: a header name is empty")
        if name not in _FORWARDED_HEADERS:
            raise ConfigurationError(
                f"headers: unknown forwarded header {header!r}; "
                f"choose from {', '.join(map(repr, _FORWARDED_HEADERS))}"
            )
        encoded = name.encode("ascii")
        if encoded not in names:
            names.append(encoded)
    return tuple(names)


def client_ip(
    *,
    trusted_proxies: Iterable[str] = (),
    headers: Sequence[str] = ("x-forwarded-for",),
    ipv6_prefix: int = 64,
) -> Callable[[Scope], str]:
    """Build a key function that identifies the client by IP address.

    By default the key is the socket peer. Forwarded headers count only when the peer is one
    of ``trusted_proxies``: then the first of ``headers`` present in the request is read right
    to left, skipping addresses that are themselves trusted proxies, and the first untrusted
    address is the client (the leftmost one if all are trusted). An entry that is not an IP
    address (``unknown``, an obfuscated ``_name``, garbage) ends the walk at the nearest
    trusted hop. At most 64 hops are examined.

    IPv6 clients are grouped by their ``/ipv6_prefix`` network, since one host usually holds a
    whole /64; IPv4-mapped IPv6 becomes IPv4. A scope without a client gets ``"unknown"``
    (all such requests share that key) and a single warning on the ``asgi_guard`` logger.

    Args:
        trusted_proxies: Addresses or CIDR networks of the proxies in front of the app, such as
            ``["10.0.0.0/8", "::1"]``.
        headers: Which forwarded headers to read, in order of preference: any of
            ``"forwarded"`` (RFC 7239), ``"x-forwarded-for"`` (the default) and
            ``"x-real-ip"``. Name only headers your proxies set or strip: one they pass
            through unchanged is whatever the client wrote, and if it comes first in
            ``headers`` the client picks its own key.
        ipv6_prefix: Prefix length IPv6 clients are grouped by; 128 keys each address.

    Returns:
        A synchronous key function taking the ASGI scope.

    Raises:
        ConfigurationError: For a malformed proxy address, an unknown header name or an
            ``ipv6_prefix`` outside 0..128.

    Examples:
        >>> key = client_ip(trusted_proxies=["10.0.0.0/8"])
        >>> key({
        ...     "type": "http",
        ...     "client": ("10.0.0.5", 4711),
        ...     "headers": [(b"x-forwarded-for", b"203.0.113.7, 10.0.0.2")],
        ... })
        '203.0.113.7'
    """
    _check_prefix(ipv6_prefix)
    trusted_v4, trusted_v6 = _trusted_networks(trusted_proxies)
    order = _check_headers(headers)
    if not (trusted_v4 or trusted_v6) or not order:
        return _peer_key_func(ipv6_prefix)

    peer_key = _peer_key_func(ipv6_prefix)
    wanted = frozenset(order)
    parsers = tuple((name, *_NODE_PARSERS[name]) for name in order)

    @functools.lru_cache(maxsize=_CACHE_SIZE)
    def classify(text: str) -> _Hop | None:
        """Return ``(key, is_trusted_proxy)`` for an address literal, ``None`` otherwise."""
        address = _parse_ip(text)
        if address is None:
            return None
        value = int(address)
        networks = trusted_v4 if address.version == 4 else trusted_v6
        trusted = any(value & mask == network for network, mask in networks)
        return _address_key(address, ipv6_prefix), trusted

    def walk(
        value: bytes,
        split: Callable[[bytes], list[bytes]],
        parse_node: Callable[[bytes], str | None],
        nearest: str,
    ) -> str:
        for entry in reversed(split(value)):
            node = parse_node(entry)
            hop = None if node is None else classify(node)
            if hop is None:
                return nearest
            key, trusted = hop
            if not trusted:
                return key
            nearest = key
        return nearest

    def forwarded_key(scope: Scope) -> str:
        client = scope.get("client")
        if not client or not client[0]:
            return peer_key(scope)
        hop = classify(client[0])
        if hop is None:
            return peer_key(scope)
        key, trusted = hop
        if not trusted:
            return key
        found: dict[bytes, list[bytes]] = {}
        for name, value in scope.get("headers") or ():
            name = name.lower()
            if name in wanted:
                found.setdefault(name, []).append(value)
        for name, split, parse_node in parsers:
            lines = found.get(name)
            if lines and any(line.strip() for line in lines):
                return walk(b",".join(lines), split, parse_node, key)
        return key

    return forwarded_key


def _check_header_name(name: str) -> bytes:
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(
            f"header_key: the header name must be a non-empty string, got {name!r}"
        )
    name = name.strip()
    if not _TOKEN_CHARS.issuperset(name):
        raise ConfigurationError(f"header_key: {name!r} is not a valid HTTP header name")
    return name.lower().encode("ascii")


def _header_value(scope: Scope, target: bytes) -> str | None:
    """Return ``name=value`` of the first ``target`` header, hashed when long; ``None`` if empty.

    The header's name prefixes the value so that no header value can pose as a client
    address (``X-API-Key: 192.0.2.1``) or as another header's value in a fallback chain.
    """
    size = len(target)
    for name, raw in scope.get("headers") or ():
        if name == target or (len(name) == size and name.lower() == target):
            value: bytes = raw.strip()
            if not value:
                return None
            if len(value) > _MAX_HEADER_KEY_CHARS:
                digest = hashlib.blake2b(value, digest_size=16).hexdigest()
                return f"{target.decode()}#{digest}"
            return f"{target.decode()}={value.decode('latin-1')}"
    return None


def _is_async_callable(obj: object) -> bool:
    while isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or (
        callable(obj) and inspect.iscoroutinefunction(obj.__call__)
    )


@overload
def header_key(name: str, *, fallback: None = None) -> Callable[[Scope], str]: ...


@overload
def header_key(name: str, *, fallback: KeyFunc) -> Callable[[Scope], str | Awaitable[str]]: ...


def header_key(
    name: str, *, fallback: KeyFunc | None = None
) -> Callable[[Scope], str | Awaitable[str]]:
    """Build a key function that identifies the client by a request header, such as an API key.

    The key is ``"<name>=<value>"`` of the first occurrence of header ``name``
    (case-insensitive, lower-cased name, latin-1 decoded, stripped value): the name keeps a
    header value from posing as a client address or as another header's value. Values over
    256 characters become ``"<name>#<BLAKE2b digest>"``, so a huge header cannot bloat the
    store. When the header is missing or empty the key comes from
    ``fallback``, or from the socket peer (as `peer_address`) without one.

    The returned function is synchronous unless ``fallback`` is an async function, in which
    case it is async too.

    Args:
        name: The request header to read, such as ``"x-api-key"``.
        fallback: Key function for requests without the header.

    Returns:
        A key function taking the ASGI scope.

    Raises:
        ConfigurationError: If ``name`` is empty or not a valid header name, or
            ``fallback`` is not callable.

    Examples:
        >>> key = header_key("x-api-key")
        >>> key({"type": "http", "client": ("192.0.2.1", 1), "headers": [(b"x-api-key", b"k1")]})
        'x-api-key=k1'
    """
    target = _check_header_name(name)
    if fallback is not None and not callable(fallback):
        raise ConfigurationError(
            f"header_key: fallback must be a key function of the scope, got {fallback!r}"
        )

    if fallback is None:
        peer_key = _peer_key_func(64)

        def header_or_peer(scope: Scope) -> str:
            value = _header_value(scope, target)
            return peer_key(scope) if value is None else value

        return header_or_peer

    fallback_key = fallback
    if _is_async_callable(fallback_key):

        async def header_or_async_fallback(scope: Scope) -> str:
            value = _header_value(scope, target)
            if value is not None:
                return value
            result = fallback_key(scope)
            if isinstance(result, str):
                return result
            return await result

        return header_or_async_fallback

    def header_or_fallback(scope: Scope) -> str | Awaitable[str]:
        value = _header_value(scope, target)
        return fallback_key(scope) if value is None else value

    return header_or_fallback
