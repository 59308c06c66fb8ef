"""Property tests: the namespaces and keys a remote storage sees are safe and distinct."""

from __future__ import annotations

import re
import urllib.parse

from hypothesis import example, given
from hypothesis import strategies as st

from asgi_guard._limiter import _MAX_STORAGE_KEY, _storage_key

#: Printable ASCII without whitespace, less the delimiters (``/{|}``), or a percent escape.
SAFE = re.compile(r"(?:[!-$&-.0-z~]|%[0-9A-F]{2})*")
DIGEST = re.compile(r"%sha256:[0-9a-f]{32}")

parts = st.text(st.characters(codec="utf-8") | st.sampled_from(" %/{|}\x00\r\n\ud800"))


@given(parts)
@example("rule:/users/{user_id}")
@example("route:GET /items/{i}")
@example("/reports/a b\x00192.0.2.7")
@example("x-api-key=" + "k" * 240)
@example("")
def test_storage_keys_are_safe_and_short(part: str) -> None:
    """Every storage key is printable ASCII with no whitespace, no '/', '{', '|' or '}', and
    at most 100 characters (memcached refuses the rest; the others delimit key names)."""
    safe = _storage_key(part)
    assert SAFE.fullmatch(safe) or DIGEST.fullmatch(safe), safe
    assert len(safe) <= _MAX_STORAGE_KEY, safe


@given(parts)
def test_storage_keys_are_distinct(part: str) -> None:
    """A short storage key decodes back to its part, and no short key looks like a digest:
    two different parts never share a key (short of a SHA-256 collision)."""
    safe = _storage_key(part)
    if DIGEST.fullmatch(safe):
        return
    assert urllib.parse.unquote(safe, errors="surrogatepass") == part, safe
    assert not safe.startswith("%s"), safe


def test_long_parts_differing_at_the_end_have_different_digests() -> None:
    """Two long keys that differ only in their last character are two digests."""
    first, second = _storage_key("k" * 200 + "1"), _storage_key("k" * 200 + "2")
    assert DIGEST.fullmatch(first), first
    assert DIGEST.fullmatch(second), second
    assert first != second


@example("policy:api")
@example("default")
@example("192.0.2.7")
@example("x-api-key=k1")
@given(st.from_regex(r"[!-$&-.0-z~]{0,100}", fullmatch=True))
def test_ordinary_keys_stay_as_they_are(part: str) -> None:
    """Printable ASCII without the delimiters, up to 100 characters, is not escaped."""
    assert _storage_key(part) == part
