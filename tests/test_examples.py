"""Every example runs as the docs say, and the README and CI agree with the examples."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp

import asgi_guard
import asgi_guard.fastapi
from asgi_guard import QUOTA_EXCEEDED, ConfigurationError, GuardError, ManualClock, StorageEvent

from .asgi_driver import until

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _away_from_a_windows_end() -> None:
    """The examples count on the real clock, in memory windows aligned on it (a minute's):
    a test that began just before a minute's end would see its counts start over midway.
    Within two seconds of one, wait for it to pass."""
    left = 60.0 - time.monotonic() % 60.0
    if left < 2.0:
        time.sleep(left + 0.01)


ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
PROBLEM_JSON = "application/problem+json"
_loads = itertools.count()


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` afresh, so every test starts with empty counters."""
    path = EXAMPLES / f"{name}.py"
    module_name = f"_asgi_guard_example_{name}_{next(_loads)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None, path
    assert spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def client_for(
    app: ASGIApp, client: tuple[str, int] = ("127.0.0.1", 50000)
) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


async def statuses(http: httpx.AsyncClient, method: str, *paths: str, **kw: Any) -> list[int]:
    return [(await http.request(method, path, **kw)).status_code for path in paths]


def assert_problem(r: httpx.Response, status: int = 429) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM_JSON), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status, body
    assert "127.0.0.1" not in r.text, r.text
    return body


# -- quickstart -------------------------------------------------------------------------------


async def test_quickstart_limits_login_after_five_posts() -> None:
    """The README quickstart: the dependency refuses the 6th POST /login within a minute."""
    app = load("quickstart").app
    async with client_for(app) as http:
        assert await statuses(http, "POST", *["/login"] * 5) == [200] * 5
        r = await http.post("/login")
    assert r.status_code == 429, r.text
    assert "retry-after" in r.headers, r.headers
    assert '"5-per-60s";q=5;w=60' in r.headers["ratelimit-policy"], r.headers
    assert r.headers["content-type"] == "application/problem+json", r.headers
    assert r.json()["violated-policies"] == ["5-per-60s"], r.text


# -- the demo ---------------------------------------------------------------------------------


async def test_demo_hello_is_refused_with_problem_json_after_five() -> None:
    """The demo's first curl loop: five 200s, then a 429 problem+json with Retry-After."""
    app = load("demo").app
    async with client_for(app) as http:
        ok = [await http.get("/hello") for _ in range(5)]
        r = await http.get("/hello")
    assert [x.status_code for x in ok] == [200] * 5, ok[-1].text
    assert ok[0].headers["ratelimit-policy"] == '"5-per-60s";q=5;w=60', ok[0].headers
    assert ok[0].headers["ratelimit"].startswith('"5-per-60s";r=4;t='), ok[0].headers
    body = assert_problem(r)
    assert body["type"] == QUOTA_EXCEEDED, body
    assert body["violated-policies"] == ["5-per-60s"], body
    assert int(r.headers["retry-after"]) >= 1, r.headers


async def test_demo_points_to_its_list_of_routes() -> None:
    """What the demo prints names ``/docs``, and ``/docs`` answers: FastAPI's page of the
    routes, for whoever opens the demo in a browser (``/`` is not a route)."""
    demo = load("demo")
    assert f"http://{demo.HOST}:{demo.PORT}/docs" in demo.CURL_COMMANDS
    async with client_for(demo.app) as http:
        r = await http.get("/docs")
    assert r.status_code == 200, r.text
    assert "asgi_guard demo" in r.text, r.text[:200]


async def test_demo_login_rule_applies_to_post_only() -> None:
    """The POST /login rule allows three; other methods fall under the default limit."""
    app = load("demo").app
    async with client_for(app) as http:
        assert await statuses(http, "POST", *["/login"] * 4) == [200, 200, 200, 429]
        assert await statuses(http, "GET", "/login") == [405]


async def test_demo_dependency_route_answers_through_the_handler() -> None:
    """/items/{item_id} shares one dependency quota of two; the 429 is problem+json."""
    app = load("demo").app
    async with client_for(app) as http:
        assert await statuses(http, "GET", "/items/1", "/items/2") == [200, 200]
        r = await http.get("/items/3")
    body = assert_problem(r)
    assert body["type"] == QUOTA_EXCEEDED, body
    assert body["violated-policies"] == ["2-per-60s"], body
    assert "retry-after" in r.headers, r.headers


async def test_demo_report_bulkhead_refuses_a_second_report_meanwhile() -> None:
    """The demo's last curl: a report while another runs is 503 problem+json."""
    demo = load("demo")
    async with client_for(demo.app) as http:
        responses: list[httpx.Response] = []

        async def get() -> None:
            responses.append(await http.get("/report"))

        async with anyio.create_task_group() as group:
            group.start_soon(get)
            await anyio.sleep(0.2)
            group.start_soon(get)
    assert sorted(r.status_code for r in responses) == [200, 503]
    refused = next(r for r in responses if r.status_code == 503)
    assert_problem(refused, 503)
    assert refused.headers["retry-after"] in ("1", "2")


async def test_demo_health_is_never_limited() -> None:
    """/health is exempt: far more requests than any limit, all 200, no RateLimit headers."""
    app = load("demo").app
    async with client_for(app) as http:
        responses = [await http.get("/health") for _ in range(120)]
    assert {r.status_code for r in responses} == {200}, responses[-1].text
    assert "ratelimit" not in responses[-1].headers, responses[-1].headers


def test_demo_main_prints_the_curl_commands_and_serves_on_8000(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python examples/demo.py`` prints the curl loop and runs uvicorn on 127.0.0.1:8000."""
    import uvicorn

    demo = load("demo")
    served: list[tuple[object, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append((app, kw)))
    demo.main()
    assert served == [(demo.app, {"host": "127.0.0.1", "port": 8000})], served
    printed = capsys.readouterr().out
    assert "for i in $(seq 1 6); do curl -si http://127.0.0.1:8000/hello | head -1; done" in (
        printed
    ), printed
    assert "curl -si -X POST http://127.0.0.1:8000/login" in printed, printed
    assert "http://127.0.0.1:8000/items/$i" in printed, printed
    assert "curl -si http://127.0.0.1:8000/slow" in printed, printed


async def test_demo_slow_route_gets_its_504_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The demo's /slow is answered 504 problem+json at its deadline; a short one is in time."""
    demo = load("demo")
    async with client_for(demo.app) as http:
        r = await http.get("/slow", params={"seconds": "0.01"})
        assert r.status_code == 200, r.text
        assert 4.9 < r.json()["seconds_left"] <= 5.0
        r = await http.get("/search", params={"seconds": "30"}, headers={})
    assert_problem(r, 504)
    assert "2 s deadline" in r.json()["detail"]


# -- FastAPI dependencies ---------------------------------------------------------------------


async def test_dependencies_named_policy_is_one_quota_for_the_router() -> None:
    """The router's named policy: /reports/daily and /reports/monthly share ten per minute."""
    app = load("dependencies").app
    async with client_for(app) as http:
        codes = await statuses(http, "GET", *[f"/reports/{p}" for p in ["daily", "monthly"] * 5])
        r = await http.get("/reports/daily")
    assert codes == [200] * 10, codes
    body = assert_problem(r)
    assert body["violated-policies"] == ["reports"], body


async def test_dependencies_per_route_key_and_app_limit() -> None:
    """/search counts per API key; the app-wide dependency adds its quota to the headers."""
    app = load("dependencies").app
    async with client_for(app) as http:
        k1 = await statuses(http, "GET", *["/search"] * 6, headers={"x-api-key": "k1"})
        r = await http.get("/search", headers={"x-api-key": "k2"})
    assert k1 == [200] * 5 + [429], k1
    assert r.status_code == 200, r.text
    assert r.headers["ratelimit-policy"].count(";q=") == 2, r.headers


# -- policies ---------------------------------------------------------------------------------


async def test_policies_dry_run_logs_but_never_rejects(caplog: pytest.LogCaptureFixture) -> None:
    """The dry-run policy logs the 4th request it would refuse; headers show only enforced ones."""
    caplog.set_level(logging.INFO, logger="asgi_guard")
    app = load("policies").app
    async with client_for(app) as http:
        responses = [await http.get("/") for _ in range(4)]
    assert [r.status_code for r in responses] == [200] * 4, responses[-1].text
    policy = responses[0].headers["ratelimit-policy"]
    assert policy == '"api-10-per-1s";q=10;w=1, "api-1000-per-3600s";q=1000;w=3600', policy
    assert "candidate" not in responses[-1].headers["ratelimit"], responses[-1].headers
    dry = [r for r in caplog.records if "dry run" in r.getMessage()]
    assert len(dry) == 1, caplog.text
    assert "candidate" in dry[0].getMessage(), caplog.text


async def test_policies_token_bucket_allows_a_burst_of_five() -> None:
    """The uploads token bucket admits five POSTs at once, then refuses."""
    app = load("policies").app
    async with client_for(app) as http:
        assert await statuses(http, "POST", *["/uploads"] * 6) == [200] * 5 + [429]
        r = await http.post("/uploads")
    assert assert_problem(r)["violated-policies"] == ["uploads"]


async def test_policies_cost_function_charges_csv_exports_five() -> None:
    """A CSV export costs 5 of 20 per minute: four pass, then even a cheap export is refused."""
    app = load("policies").app
    async with client_for(app) as http:
        csv = await statuses(http, "GET", *["/exports?format=csv"] * 5)
        json_export = await http.get("/exports")
    assert csv == [200, 200, 200, 200, 429], csv
    assert json_export.status_code == 429, json_export.text


async def test_policies_named_policy_is_shared_by_both_routes() -> None:
    """One dependency built from a named policy: /search and /suggest share five per minute."""
    app = load("policies").app
    async with client_for(app) as http:
        codes = await statuses(http, "GET", "/search", "/suggest", "/search", "/suggest")
        codes += await statuses(http, "GET", "/search", "/suggest")
    assert codes == [200] * 5 + [429], codes


# -- rules ------------------------------------------------------------------------------------


async def test_rules_template_counts_users_together() -> None:
    """/users/1 and /users/2 share the /users/{user_id:int} rule's ten per minute."""
    app = load("rules").app
    async with client_for(app) as http:
        codes = await statuses(http, "GET", *[f"/users/{i % 2}" for i in range(11)])
    assert codes == [200] * 10 + [429], codes


async def test_rules_method_and_per_path() -> None:
    """POST /login is limited to 5 (GET is not); each report counts apart (per_path)."""
    app = load("rules").app
    async with client_for(app) as http:
        assert await statuses(http, "POST", *["/login"] * 6) == [200] * 5 + [429]
        assert await statuses(http, "GET", *["/login"] * 6) == [200] * 6
        assert await statuses(http, "GET", *["/reports/a"] * 4) == [200] * 3 + [429]
        assert await statuses(http, "GET", "/reports/b") == [200]


async def test_rules_static_health_and_internal_clients_are_exempt() -> None:
    """limit=None, exempt paths and the exempt predicate: none of them is ever refused."""
    app = load("rules").app
    async with client_for(app) as http:
        assert set(await statuses(http, "GET", *["/static/css/site.css"] * 110)) == {200}
        assert set(await statuses(http, "GET", *["/health"] * 110)) == {200}
    async with client_for(app, client=("10.1.2.3", 40000)) as internal:
        assert set(await statuses(internal, "GET", *["/reports/a"] * 10)) == {200}


# -- keys -------------------------------------------------------------------------------------


async def test_keys_forwarded_for_counts_only_from_trusted_proxies() -> None:
    """X-Forwarded-For counts per client from the trusted proxy, and is ignored from others."""
    app = load("keys").app
    one = {"x-forwarded-for": "203.0.113.1"}
    two = {"x-forwarded-for": "203.0.113.2"}
    async with client_for(app) as proxy:
        assert await statuses(proxy, "GET", *["/api/a"] * 6, headers=one) == [200] * 5 + [429]
        assert await statuses(proxy, "GET", "/api/a", headers=two) == [200]
    async with client_for(app, client=("198.51.100.9", 40000)) as direct:
        codes = [
            (await direct.get("/api/a", headers={"x-forwarded-for": f"203.0.113.{i}"})).status_code
            for i in range(10, 16)
        ]
    assert codes == [200] * 5 + [429], codes


async def test_keys_api_key_header_has_its_own_quota() -> None:
    """Each X-Api-Key value is counted apart from the others."""
    app = load("keys").app
    async with client_for(app) as http:
        k1 = await statuses(http, "GET", *["/api/items"] * 6, headers={"x-api-key": "k1"})
        k2 = await statuses(http, "GET", "/api/items", headers={"x-api-key": "k2"})
    assert (k1, k2) == ([200] * 5 + [429], [200]), (k1, k2)


async def test_keys_async_key_counts_per_account() -> None:
    """The async key function counts per account: alice's 4th /me is refused, bob's passes."""
    app = load("keys").app
    alice = {"authorization": "Bearer token-alice"}
    bob = {"authorization": "Bearer token-bob"}
    async with client_for(app) as http:
        assert await statuses(http, "GET", *["/me"] * 4, headers=alice) == [200] * 3 + [429]
        assert await statuses(http, "GET", "/me", headers=bob) == [200]


# -- Starlette and plain ASGI -----------------------------------------------------------------


async def test_starlette_app_default_and_rule() -> None:
    """The Starlette app: ten per minute by default, three POST /login."""
    app = load("starlette_app").app
    async with client_for(app) as http:
        assert await statuses(http, "GET", *["/"] * 11) == [200] * 10 + [429]
        assert await statuses(http, "POST", *["/login"] * 4) == [200] * 3 + [429]


async def test_plain_asgi_app_is_wrapped_with_legacy_headers_and_lifespan() -> None:
    """The wrapped ASGI callable passes lifespan through and sends X-RateLimit-* headers."""
    asgi_app = load("starlette_app").asgi_app
    async with client_for(asgi_app) as http:
        responses = [await http.get("/anything") for _ in range(11)]
    assert [r.status_code for r in responses] == [200] * 10 + [429], responses[-1].text
    assert responses[0].text == "plain ASGI", responses[0].text
    assert responses[0].headers["x-ratelimit-limit"] == "10", responses[0].headers
    assert responses[0].headers["x-ratelimit-remaining"] == "9", responses[0].headers
    assert "ratelimit" not in responses[0].headers, responses[0].headers


# -- order of middlewares ---------------------------------------------------------------------


async def test_ordering_puts_cors_headers_on_the_429() -> None:
    """CORS added last (outermost): the rate limiter's 429 carries CORS headers too."""
    app = load("ordering").app
    origin = {"origin": "https://app.example.com"}
    async with client_for(app) as http:
        ok = [await http.get("/data", headers=origin) for _ in range(5)]
        r = await http.get("/data", headers=origin)
    assert [x.status_code for x in ok] == [200] * 5, ok[-1].text
    assert_problem(r)
    assert r.headers["access-control-allow-origin"] == "https://app.example.com", r.headers
    assert "ratelimit" in r.headers["access-control-expose-headers"].lower(), r.headers


# -- custom responses and events --------------------------------------------------------------


async def test_custom_response_and_event_callback() -> None:
    """The response factory adds a hint to the problem; the callback counts the rejection."""
    example = load("custom_response")
    async with client_for(example.app) as http:
        assert await statuses(http, "GET", *["/"] * 3) == [200] * 3
        r = await http.get("/")
    body = assert_problem(r)
    assert body["type"] == QUOTA_EXCEEDED, body
    assert body["hint"].startswith("Slow down"), body
    assert body["violated-policies"] == ["3-per-60s"], body
    assert "retry-after" in r.headers, r.headers
    assert "ratelimit" in r.headers, r.headers
    assert example.metrics.rejected == {"3-per-60s": 1}, example.metrics.rejected


# -- Redis (no server here) -------------------------------------------------------------------


def test_redis_example_imports_without_a_server() -> None:
    """Importing the Redis example builds a remote limiter without connecting to anything."""
    example = load("redis_storage")
    limiter = example.limiter
    assert limiter.is_memory is False
    assert (limiter.uri, limiter.timeout) == ("redis://127.0.0.1:6379", 0.1)
    assert example.login_policy.on_storage_error == "deny"
    assert example.browse.on_storage_error == "allow"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_example_health_follows_storage_events() -> None:
    """The exempt /health reports the storage state that StorageEvents set (asyncio only)."""
    example = load("redis_storage")
    async with client_for(example.app) as http:
        # Startup probes the storage (whether a Redis listens here or not); events then rule.
        example.storage_health(StorageEvent("recovered", example.limiter.uri, ""))
        up = (await http.get("/health")).json()
        example.storage_health(StorageEvent("unavailable", example.limiter.uri, "refused"))
        down = (await http.get("/health")).json()
    assert (up, down) == ({"rate_limit_storage": "up"}, {"rate_limit_storage": "down"})
    assert example.storage_health.last_error == "refused"


# -- the engine -------------------------------------------------------------------------------


async def test_engine_counts_on_a_manual_clock() -> None:
    """RateLimiter.hit admits three, refuses the fourth, and admits again a minute later."""
    engine = load("engine")
    clock = ManualClock()
    lines = await engine.run_jobs(
        engine.make_limiter(clock), clock, engine.policy_from_settings("3/minute")
    )
    assert lines == [
        "allowed, 2 of 3 left for 60s",
        "allowed, 1 of 3 left for 60s",
        "allowed, 0 of 3 left for 60s",
        "refused by jobs, retry in 60s",
        "allowed, 2 of 3 left for 60s",
    ], lines


async def test_engine_main_prints_every_decision(capsys: pytest.CaptureFixture[str]) -> None:
    """``python examples/engine.py`` prints one line per decision."""
    await load("engine").main()
    assert capsys.readouterr().out.count("\n") == 5


def test_engine_bad_setting_fails_at_startup() -> None:
    """A malformed limit stops the program with the ConfigurationError's message."""
    engine = load("engine")
    with pytest.raises(SystemExit, match="invalid JOBS_LIMIT") as excinfo:
        engine.policy_from_settings("three a fortnight")
    cause = excinfo.value.__cause__
    assert isinstance(cause, ConfigurationError), cause
    assert isinstance(cause, GuardError), cause


# -- the docs cannot rot ----------------------------------------------------------------------


def _public_names() -> list[str]:
    return [*asgi_guard.__all__, *asgi_guard.fastapi.__all__]


def _text(paths: Iterator[Path]) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(paths))


@pytest.mark.parametrize("where", ["examples", "docs"])
def test_every_public_name_is_used_in_examples_and_docs(where: str) -> None:
    """Each name in the ``__all__`` of asgi_guard and asgi_guard.fastapi appears in ``where``."""
    text = _text((ROOT / where).rglob("*.py" if where == "examples" else "*.md"))
    missing = [name for name in _public_names() if not re.search(rf"\b{name}\b", text)]
    assert not missing, f"not in {where}/: {missing}"


def test_docs_snippets_point_at_existing_files() -> None:
    """Every ``--8<--`` include in docs/ names a file that exists."""
    text = _text(DOCS.rglob("*.md"))
    included = re.findall(r'--8<-- "([^"]+)"', text)
    for block in re.findall(r"^--8<--\n(.*?)\n--8<--$", text, re.MULTILINE | re.DOTALL):
        included.extend(line.strip() for line in block.splitlines() if line.strip())
    assert included, "docs/ include no snippets"
    missing = [path for path in included if not (ROOT / path.split(":")[0]).is_file()]
    assert not missing, missing


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def _readme_commands() -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)\n```", _readme(), re.DOTALL)[:2]


def test_readme_opens_with_two_one_line_commands() -> None:
    """After the title and one sentence, the README gives the demo and the test command."""
    head = _readme().split("```", 1)[0]
    assert head.startswith("# asgi_guard\n"), head
    demo, test = _readme_commands()
    for command in (demo, test):
        assert "\n" not in command, command
        assert command.startswith("python3 -m venv"), command
    assert demo.endswith("examples/demo.py"), demo
    assert test.endswith("-m pytest"), test


def test_readme_quickstart_is_examples_quickstart() -> None:
    """The README's quickstart block is exactly examples/quickstart.py."""
    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.DOTALL)
    quickstart = (EXAMPLES / "quickstart.py").read_text(encoding="utf-8")
    assert blocks, "no python block in README.md"
    assert blocks[0] == quickstart, blocks[0]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    """.ci/run runs the README's second command verbatim, at the start of a line."""
    test_command = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert any(line.startswith(test_command) for line in ci.splitlines()), test_command


# -- timeouts ---------------------------------------------------------------------------------


def _upstream(delay: float) -> httpx.AsyncClient:
    """A client for a local upstream that answers ``/price`` after ``delay`` seconds."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def price(request: Any) -> JSONResponse:
        await anyio.sleep(delay)
        return JSONResponse({"price": 42})

    upstream = Starlette(routes=[Route("/price", price)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream), base_url="http://up")


async def test_timeouts_search_route_is_tighter_than_the_app() -> None:
    """/search answers a quick query and gives a slow one its 504 at 0.5 s."""
    timeouts = load("timeouts")
    async with client_for(timeouts.app) as http:
        assert (await http.get("/search", params={"q": "x"})).status_code == 200
        started = time.monotonic()
        r = await http.get("/search")
    assert_problem(r, 504)
    assert 0.5 <= time.monotonic() - started < 0.8
    assert [e.kind for e in timeouts.timeouts] == ["deadline"]
    assert timeouts.timeouts[0].route == "/search"


async def test_timeouts_suggest_answers_with_what_fits_in_its_budget() -> None:
    """/suggest stops its lookups 0.1 s before its 0.5 s deadline and answers with what it
    found: a 200 with part of the list, not a 504."""
    timeouts = load("timeouts")
    async with client_for(timeouts.app) as http:
        started = time.monotonic()
        r = await http.get("/suggest")
        took = time.monotonic() - started
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["complete"] is False
    assert 2 <= len(body["suggestions"]) <= 8, body
    assert took < 0.5
    assert timeouts.timeouts == []


async def test_timeouts_report_route_may_take_longer() -> None:
    """/report outlasts the 1 s app default within its own 3 s deadline."""
    timeouts = load("timeouts")
    async with client_for(timeouts.app) as http:
        r = await http.get("/report")
    assert r.status_code == 200, r.text
    assert 1.5 < r.json()["seconds_left"] < 1.8


async def test_timeouts_quote_bounds_the_upstream_call_by_the_budget() -> None:
    """/quote passes a quick upstream answer through; a stuck upstream ends in a 504 on time."""
    timeouts = load("timeouts")
    timeouts.__dict__["upstream"] = _upstream(0.0)
    async with client_for(timeouts.app) as http:
        r = await http.get("/quote")
        assert r.status_code == 200, r.text
        assert r.json()["price"] == 42
        assert 0.5 < r.json()["budget_left"] <= 1.0
        timeouts.__dict__["upstream"] = _upstream(30.0)
        started = time.monotonic()
        r = await http.get("/quote")
    assert r.status_code == 504, r.text
    assert time.monotonic() - started < 1.3


async def test_timeouts_caller_header_and_background_task(caplog: pytest.LogCaptureFixture) -> None:
    """A caller's X-Request-Timeout tightens the deadline; background tasks have none."""
    timeouts = load("timeouts")
    async with client_for(timeouts.app) as http:
        r = await http.get("/search", params={"q": "x"}, headers={"x-request-timeout": "50m"})
        assert_problem(r, 504)
        with caplog.at_level(logging.INFO, logger="examples.timeouts"):
            r = await http.post("/orders/book")
    assert r.status_code == 200, r.text
    assert 0.9 < r.json()["db_timeout"] <= 1.0
    assert "audited book with no deadline (remaining=None)" in caplog.text


# -- blocking detection -----------------------------------------------------------------------


async def test_blocking_example_names_the_route_that_blocks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """/report is reported with its line; /report-fixed, the same work in a thread, is not."""
    blocking = load("blocking")
    with caplog.at_level(logging.WARNING, logger="asgi_guard.blocking"):
        async with client_for(blocking.app) as http:
            assert (await http.get("/report-fixed")).status_code == 200
            await anyio.sleep(0.2)
            assert blocking.blocked_routes == {}
            assert (await http.get("/report")).status_code == 200
            with anyio.move_on_after(2):
                # Filled by the detector's report thread: polling is the only way.
                while not blocking.blocked_routes:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
    assert blocking.blocked_routes == {"/report": 1}
    assert "GET /report: the event loop was blocked" in caplog.text
    assert "time.sleep(0.3)" in caplog.text


async def test_strict_mode_example_raises_at_a_short_sleep() -> None:
    """/settings raises BlockingCallError at a 2 ms time.sleep; the message names the fix."""
    strict = load("strict_mode")
    async with client_for(strict.app) as http:
        with pytest.raises(asgi_guard.BlockingCallError, match=r"GET /settings\b"):
            await http.get("/settings")
        r = await http.get("/settings-checked")
    assert r.status_code == 200, r.text
    assert "anyio.to_thread.run_sync()" in r.json()["error"]


# -- shedding ---------------------------------------------------------------------------------


async def test_shedding_serves_routes_and_reports_its_state() -> None:
    """Every route answers under light load; /state shows the limit and the counts."""
    shedding = load("shedding")
    async with client_for(shedding.guarded) as http:
        assert (await http.post("/checkout")).status_code == 200
        assert (await http.get("/search", params={"q": "x"})).status_code == 200
        assert (await http.get("/exports/daily")).status_code == 200
        assert (await http.get("/health")).status_code == 200
        state = (await http.get("/state")).json()
    assert state["limit"] >= 1
    assert state["inflight"] == 0
    assert state["counts"]["admitted"] == 3  # /health and /state are exempt
    assert "min_rtt" in state["algorithm"]


async def test_shedding_report_bulkhead_refuses_beyond_two_running_and_two_waiting() -> None:
    """Six /report at once: two run, two wait, two get 503 problem+json with Retry-After."""
    shedding = load("shedding")
    async with client_for(shedding.guarded) as http:
        for _ in range(5):  # Adaptive measures the no-load latency first, one at a time
            assert (await http.get("/search")).status_code == 200
        assert shedding.shedder.state()["limit"] >= 6
        responses: list[httpx.Response] = []

        async def get() -> None:
            responses.append(await http.get("/report"))

        async with anyio.create_task_group() as group:
            for _ in range(6):
                group.start_soon(get)
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 200, 503, 503], [
        r.text for r in responses
    ]
    refused = [r for r in responses if r.status_code == 503]
    for r in refused:
        body = assert_problem(r, 503)
        assert body["type"].endswith("#temporary-reduced-capacity")
        assert r.headers["retry-after"] in ("1", "2")


async def test_shedding_internal_classes_by_job_and_trusted_header() -> None:
    """The internal service: the gateway's X-Priority is believed, a client's is not;
    batch jobs are sheddable; while the loop lags, sheddable requests are refused (503,
    reason trigger) and the rest served."""
    shedding = load("shedding")
    internal = shedding.internal
    assert shedding.job_class({"headers": [(b"user-agent", b"batch-reindex/2")]}) == "sheddable"
    assert shedding.job_class({"headers": [(b"user-agent", b"curl/8")]}) is None
    assert shedding.from_gateway({"client": ("10.1.2.3", 5)})
    assert not shedding.from_gateway({"client": ("203.0.113.9", 5)})
    batch = {"user-agent": "batch-reindex/2"}
    gateway = httpx.ASGITransport(app=internal, client=("10.1.2.3", 5))
    outside = httpx.ASGITransport(app=internal, client=("203.0.113.9", 5))
    async with (
        LifespanManager(internal),
        httpx.AsyncClient(transport=gateway, base_url="http://t") as via_gateway,
        httpx.AsyncClient(transport=outside, base_url="http://t") as client,
    ):
        for _ in range(5):  # Adaptive measures the no-load latency first
            assert (await via_gateway.get("/ledger")).status_code == 200
        time.sleep(0.15)  # noqa: ASYNC251 - the loop lags, on purpose
        await until(lambda: internal.state()["trigger"] == "loop_lag", within=5)
        refused = await client.get("/reindex", headers=batch)
        assert refused.status_code == 503
        assert refused.json()["reason"] == "trigger"
        # A client cannot lift itself out of its class; the gateway can.
        own = await client.get("/reindex", headers={**batch, "X-Priority": "critical-plus"})
        assert own.status_code == 503
        lifted = await via_gateway.get("/reindex", headers={**batch, "X-Priority": "critical-plus"})
        assert lifted.status_code == 200
        assert (await client.get("/ledger")).status_code == 200  # critical: served
        assert (await client.get("/health")).status_code == 200


async def test_algorithms_every_choice_serves_and_learns_from_served_requests() -> None:
    """Each algorithm's app serves /work; learning ones report their state; the home-made
    one halves its limit while the batch job runs."""
    algorithms = load("algorithms")
    for name, guard in algorithms.guarded.items():
        async with client_for(guard) as http:
            for _ in range(6):
                assert (await http.get("/work")).status_code == 200, name
        assert guard.state()["counts"]["admitted"] == 6, name
        assert guard.state()["algorithm"]["limit"] >= 1, name
    off_hours = algorithms.guarded["off_hours"]
    assert off_hours.state()["limit"] == 16
    algorithms.batch["running"] = True
    async with client_for(off_hours) as http:
        assert (await http.get("/work")).status_code == 200
    assert off_hours.state()["limit"] == 8
