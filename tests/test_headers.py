"""Property tests: the RateLimit fields are valid structured-field lists that say what we mean."""

from __future__ import annotations

from typing import Any

import http_sf
from hypothesis import given
from hypothesis import strategies as st

from asgi_guard import Policy, QuotaState
from asgi_guard.ratelimit import legacy_headers, policy_header_value, ratelimit_header_value

names = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'),
    min_size=1,
    max_size=40,
)
limits = st.builds(
    lambda amount, seconds: f"{amount}/{seconds} seconds",
    st.integers(1, 10**9),
    st.integers(1, 10**6),
)


@given(st.lists(st.tuples(names, limits), min_size=1, max_size=5, unique_by=lambda t: t[0]))
def test_policy_field_parses_back_to_names_quotas_and_windows(
    specs: list[tuple[str, str]],
) -> None:
    """RateLimit-Policy parses as an sf-list of strings with integer q and w, in order."""
    quotas = [Policy(limit, name=name).quotas[0] for name, limit in specs]
    parsed: Any = http_sf.parse(policy_header_value(quotas).encode(), tltype="list")
    assert parsed == [(q.name, {"q": q.amount, "w": q.period}) for q in quotas], parsed


@given(
    st.lists(
        st.tuples(
            names,
            st.integers(-5, 10**9),
            st.floats(-10, 10**7, allow_nan=False),
            st.booleans(),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_ratelimit_field_parses_back_with_non_negative_integers(
    specs: list[tuple[str, int, float, bool]],
) -> None:
    """RateLimit parses as an sf-list; r and t are non-negative integers, t rounded up."""
    states = [
        QuotaState(name, 100, 60, remaining, reset, allowed, 0.0)
        for name, remaining, reset, allowed in specs
    ]
    parsed: Any = http_sf.parse(ratelimit_header_value(states).encode(), tltype="list")
    assert len(parsed) == len(states)
    for (name, params), state in zip(parsed, states, strict=True):
        assert name == state.name
        assert params["r"] == max(0, state.remaining), params
        assert params["t"] >= 0
        assert params["t"] >= state.reset_after
        assert params["t"] - state.reset_after <= 1 or state.reset_after < 0


@given(st.lists(st.tuples(st.integers(0, 1000), st.floats(0, 1e5)), min_size=1, max_size=4))
def test_legacy_headers_report_the_tightest_quota(specs: list[tuple[int, float]]) -> None:
    """X-RateLimit-Remaining is the smallest remaining of all quotas, as a decimal integer."""
    states = [QuotaState(f"q{i}", 1000, 60, r, t, True, 0.0) for i, (r, t) in enumerate(specs)]
    headers = dict(legacy_headers(states))
    assert int(headers[b"x-ratelimit-remaining"]) == min(r for r, _ in specs)
    assert int(headers[b"x-ratelimit-reset"]) >= 0


def test_the_429_detail_counts_its_seconds() -> None:
    from asgi_guard._problem import rejection_detail

    assert rejection_detail(1) == "Request quota exceeded; retry after 1 second."
    assert rejection_detail(44) == "Request quota exceeded; retry after 44 seconds."
    assert "cannot be admitted" in rejection_detail(0)
