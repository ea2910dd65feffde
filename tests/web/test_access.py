"""The web interface over plain HTTP, on both backends: who sees what, login and logout, the headers
every page carries, and pages that list exactly what the JSON API lists for the same token."""

from __future__ import annotations

import html
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loreg.registry.app import api_routes
from loreg.registry.web.auth import COOKIE, UiPermission
from loreg.registry.web.card import render
from tests.support.adapters import variant

PAGES = ["/ui", "/ui/search", "/ui/exports", "/ui/adapters/org/x", "/ui/adapters/org/x/versions/1",
         "/ui/adapters/org/x/versions/1/explain", "/ui/bases/loreg-test/tiny-llama", "/ui/adapters/org/x/versions/2/compare?other=org/x:1",
         "/ui/adapters/org/x/versions/2/compare"]


@pytest.fixture
def seeded(client: Any, adapter_dir: Path, tmp_path: Path) -> Any:
    """org/x:1-2 (prod on 2), org/y:1, team-b/secret:1, pushed through the real client."""
    client.push(adapter_dir, "org/x", metrics={"eval_loss": 1.5}, aliases=["prod"], message="first")
    client.push(variant(adapter_dir, tmp_path / "v2", 2), "org/x", metrics={"eval_loss": 1.1}, aliases=["prod"])
    client.push(variant(adapter_dir, tmp_path / "v3", 3), "org/y", metrics={"eval_loss": 0.9})
    client.push(variant(adapter_dir, tmp_path / "v4", 4), "team-b/secret", metrics={"eval_loss": 0.1})
    return client


def browser(app: Any, base_url: str = "http://testserver") -> TestClient:
    return TestClient(app, base_url=base_url, raise_server_exceptions=False, follow_redirects=False)


def login(http: TestClient, token: str, next_path: str = "/ui") -> Any:
    return http.post("/ui/login", data={"token": token, "next": next_path})


def test_every_page_route_declares_a_ui_permission(app: Any) -> None:
    pages = [r for r in api_routes(app) if r.path == "/" or r.path.startswith("/ui")]
    assert len(pages) >= 10
    for route in pages:
        declared = [d.call for d in route.dependant.dependencies if isinstance(d.call, UiPermission)]
        assert len(declared) == 1, route.path
        public = route.path in ("/", "/ui/login", "/ui/logout")
        assert declared[0].public == public, route.path
        # read-only: the only forms that post are login and logout
        assert route.methods <= {"GET", "HEAD"} or route.path in ("/ui/login", "/ui/logout"), route.path


def test_pages_send_the_browser_to_login_without_a_token(app: Any, seeded: Any) -> None:
    with browser(app) as http:
        for path in PAGES:
            resp = http.get(path)
            assert resp.status_code == 303, path
            assert resp.headers["location"].startswith("/ui/login?next=%2Fui"), path
            assert "content-security-policy" in resp.headers
        assert http.get("/").headers["location"] == "/ui"


def test_anonymous_read_serves_pages_without_login(app: Any, registry: Any, seeded: Any) -> None:
    registry.settings.anonymous_read = True
    with browser(app) as http:
        for path in PAGES:
            assert http.get(path).status_code == 200, path
        assert http.post("/ui/logout").status_code == 303  # nothing to clear, still answers


def test_login_sets_a_strict_httponly_cookie_and_logout_clears_it(app: Any, seeded: Any, admin_token: str) -> None:
    with browser(app) as http:
        resp = login(http, admin_token, "/ui/adapters/org/x")
        assert resp.status_code == 303 and resp.headers["location"] == "/ui/adapters/org/x"
        cookie = resp.headers["set-cookie"]
        assert f"{COOKIE}={admin_token}" in cookie
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        assert "Secure" not in cookie  # plain http: a Secure cookie would never come back
        assert http.get("/ui/adapters/org/x").status_code == 200
        out = http.post("/ui/logout")
        assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]
        assert http.get("/ui/adapters/org/x").status_code == 303
    with browser(app, "https://testserver") as https:
        assert "Secure" in login(https, admin_token).headers["set-cookie"]


def test_login_refuses_bad_tokens_other_sites_and_foreign_redirects(app: Any, seeded: Any, admin_token: str) -> None:
    with browser(app) as http:
        bad = login(http, admin_token[:-1] + ("A" if admin_token[-1] != "A" else "B"))
        assert bad.status_code == 401 and "set-cookie" not in bad.headers
        assert "malformed token" in bad.text
        cross = http.post("/ui/login", data={"token": admin_token}, headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403 and "set-cookie" not in cross.headers
        for target in ("https://evil.example/", "//evil.example/ui", "/ui/../v1/tokens", "/v1/tokens"):
            assert login(http, admin_token, target).headers["location"] == "/ui", target
        # a token in the URL is refused, as the API refuses it
        assert http.get(f"/ui?token={admin_token}").status_code == 400


def test_a_cookie_whose_token_was_revoked_goes_back_to_login(app: Any, seeded: Any, make_token: Any, api: Any) -> None:
    token = make_token("read")
    with browser(app) as http:
        login(http, token)
        assert http.get("/ui").status_code == 200
        token_id = token.split("_")[1]
        assert api.delete(f"/v1/tokens/{token_id}").status_code == 200
        resp = http.get("/ui")
        assert resp.status_code == 303 and "reason=token+revoked" in resp.headers["location"]
        assert f'{COOKIE}=""' in resp.headers["set-cookie"]


def test_pages_enforce_the_tokens_namespaces_as_the_api(app: Any, seeded: Any, make_token: Any, api: Any) -> None:
    token = make_token("read", ["org"])
    with browser(app) as http:
        login(http, token)
        for path in ("/ui/adapters/team-b/secret", "/ui/adapters/team-b/ghost", "/ui/adapters/team-b/secret/versions/1",
                     "/ui/adapters/team-b/secret/versions/1/explain", "/ui/search?namespace=team-b",
                     "/ui/adapters/org/x/versions/1/compare?other=team-b/secret:1"):
            resp = http.get(path)
            assert resp.status_code == 403 and "DENIED" in resp.text, path
            assert "0.1" not in resp.text
        for path in ("/ui", "/ui/search", "/ui/search?q=secret", "/ui/bases/loreg-test/tiny-llama"):
            page = http.get(path)
            assert page.status_code == 200 and "team-b" not in page.text, path
        home = http.get("/ui").text
        # the base counts the two adapters this token may read, not three
        assert re.search(r'data-adapters="2"', home), home
    api_rows = api.get("/v1/adapters", headers={"Authorization": f"Bearer {token}"}).json()["items"]
    assert {r["name"] for r in api_rows} == {"org/x", "org/y"}


SEARCHES = ["", "q=x", "min_rank=8&max_rank=8", "metric=eval_loss", "metric=eval_loss&order=desc", "dora=false",
            "metric=eval_loss&metric_min=1&metric_max=2", "target=q_proj", "namespace=org&limit=1", "base=loreg-test/tiny-llama"]


def test_search_lists_the_rows_the_lookup_api_answers(app: Any, seeded: Any, admin_token: str, api: Any) -> None:
    answers: set[tuple[tuple[str, int], ...]] = set()
    with browser(app) as http:
        login(http, admin_token)
        for query in SEARCHES:
            expected = [(r["name"], r["version"]) for r in api.get(f"/v1/adapters?{query}").json()["items"]]
            page = http.get(f"/ui/search?{query}")
            assert page.status_code == 200, query
            rows = re.findall(r'<tr data-name="([^"]+)" data-version="(\d+)"', page.text)
            assert [(n, int(v)) for n, v in rows] == expected, query
            answers.add(tuple(expected))
    assert len(answers) >= 4  # the filters and orders change the rows, so equal rows mean something


def test_search_pages_follow_the_lookup_apis_cursor(app: Any, seeded: Any, admin_token: str, api: Any) -> None:
    with browser(app) as http:
        login(http, admin_token)
        path, shown = "/ui/search?metric=eval_loss&limit=1", []
        while path:
            page = http.get(path).text
            shown += re.findall(r'<tr data-name="([^"]+)"', page)
            link = re.search(r'<a class="next" href="([^"]+)"', page)
            path = html.unescape(link.group(1)) if link else None
            assert len(shown) <= 10
    expected = [r["name"] for r in api.get("/v1/adapters?metric=eval_loss").json()["items"]]
    assert shown == expected and len(shown) == 3


def test_every_page_has_the_strict_policy_and_no_inline_script(app: Any, seeded: Any, admin_token: str) -> None:
    with browser(app) as http:
        login(http, admin_token)
        for path in [*PAGES, "/ui/login", "/ui/adapters/org/ghost", "/ui/nowhere"]:
            resp = http.get(path)
            assert resp.status_code in (200, 404), path
            csp = resp.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src" not in csp and "unsafe" not in csp
            assert resp.headers["x-content-type-options"] == "nosniff"
            assert "<script" not in resp.text.lower() and " style=" not in resp.text, path
            posts = re.findall(r'<form method="post" action="([^"]+)"', resp.text)
            assert set(posts) <= {"/ui/login", "/ui/logout"}, path
        # the API keeps its JSON errors
        assert http.get("/v1/adapters/org/ghost").headers["content-type"] == "application/json"


def test_a_hostile_model_card_renders_inert_and_bounded() -> None:
    hostile = (
        "# Card <script>alert(1)</script>\n\n<img src=x onerror=alert(2)>\n\n[click](javascript:alert(3))\n\n"
        "<a href=\"javascript:alert(4)\" onclick=\"alert(5)\">x</a>\n\n<iframe src=https://evil.example></iframe>\n\n"
        + "| a | b |\n|---|---|\n" + "| 1 | 2 |\n" * 5000 + "\n" + "- " * 3000 + "deep\n"
    )
    html = str(render(hostile))
    parsed = Elements()
    parsed.feed(html)
    assert parsed.tags and {"h1", "p", "ul", "table"} <= parsed.tags
    assert not parsed.tags & {"script", "img", "iframe", "style", "object", "embed"}, parsed.tags
    assert not [a for a in parsed.attributes if a[0].startswith("on") or "javascript:" in (a[1] or "").lower()]
    assert parsed.counts["td"] <= 2000 and parsed.counts["ul"] <= 20
    assert len(html) < 200_000


class Elements(HTMLParser):
    """Every element and attribute a browser would build from some HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.attributes: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.counts[tag] += 1
        self.attributes.extend(attrs)
