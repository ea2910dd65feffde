"""The web interface in a real browser (Chromium through Playwright) against a real `loreg serve`:
the numbers each page shows equal the API's, charts hold one element per version or module with the
API's values, links lead where they say, the keyboard reaches every link, namespaces hold, and a
hostile model card does nothing. Every page also gets a screenshot (see conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.support.server import poll_until
from tests.web.conftest import Site, log_in

pytestmark = pytest.mark.slow


def api(site: Site, path: str, token: str | None = None) -> Any:
    resp = httpx.get(f"{site.url}{path}", headers={"Authorization": f"Bearer {token or site.admin}"}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def values(page: Any, selector: str, attr: str = "data-value") -> list[str]:
    return page.eval_on_selector_all(selector, f"els => els.map(e => e.getAttribute('{attr}'))")


def test_home_lists_bases_with_the_apis_counts_and_recent_versions(watched: Any, site: Site, shots: Path) -> None:
    page = watched
    log_in(page, site)
    page.screenshot(path=shots / "home.png", full_page=True)
    expected = api(site, "/v1/adapters?base=loreg-test/tiny-llama")["items"]
    validated = {r["name"] for r in expected if r["match"] == "validated"}
    assert values(page, "#bases tbody tr", "data-adapters") == [str(len(validated))]
    recent = api(site, "/v1/adapters?all_versions=true&limit=20")["items"]
    shown = values(page, "#results tbody tr", "data-name")
    assert list(zip(shown, map(int, values(page, "#results tbody tr", "data-version")), strict=True)) == [
        (r["name"], r["version"]) for r in recent
    ]


def test_search_filters_and_sorts_as_the_lookup_api(watched: Any, site: Site, shots: Path) -> None:
    page = watched
    log_in(page, site)
    page.fill("input[name=q]", "a")
    page.click("form.filters button")
    page.wait_for_url("**/ui/search?**")
    forms = [
        ({"metric": "eval_loss"}, {}),
        ({"metric": "eval_loss"}, {"order": "desc"}),
        ({"max_rank": "4"}, {}),
        ({"metric": "eval_loss", "metric_max": "1.25"}, {}),
        ({"target": "v_proj"}, {}),
        ({"namespace": "org", "metric": "accuracy"}, {}),
    ]
    seen = set()
    for fields, selects in forms:
        page.goto(f"{site.url}/ui/search")
        for name, value in fields.items():
            page.fill(f"form.filters input[name={name}]", value)
        for name, value in selects.items():
            page.select_option(f"form.filters select[name={name}]", value)
        page.click("form.filters button")
        page.wait_for_load_state()
        query = "&".join(f"{k}={v}" for k, v in {**fields, **selects}.items())
        expected = [(r["name"], r["version"]) for r in api(site, f"/v1/adapters?{query}")["items"]]
        rows = list(zip(values(page, "#results tbody tr", "data-name"), map(int, values(page, "#results tbody tr", "data-version")), strict=True))
        assert rows == expected, query
        seen.add(tuple(rows))
    assert len(seen) >= 4
    page.screenshot(path=shots / "search.png", full_page=True)


def test_base_page_shows_digests_architecture_and_its_adapters(watched: Any, site: Site, shots: Path) -> None:
    page = watched
    log_in(page, site)
    page.click("#bases a")
    page.wait_for_url("**/ui/bases/loreg-test/tiny-llama")
    base = api(site, "/v1/base-models/loreg-test/tiny-llama")
    assert page.text_content("#weights-digest") == base["weights_digest"]
    assert page.text_content("#layout-digest") == base["layout_digest"]
    assert page.text_content("[data-fact=parameters]") == str(base["parameter_count"])
    assert page.text_content("[data-fact=layers]") == "2"
    page.fill("form.filters input[name=max_rank]", "4")
    page.click("form.filters button")
    page.wait_for_load_state()
    expected = api(site, "/v1/adapters?base=loreg-test/tiny-llama&max_rank=4")["items"]
    assert values(page, "#results tbody tr", "data-name") == [r["name"] for r in expected] == ["org/beta"]
    page.goto(f"{site.url}/ui/bases/loreg-test/tiny-llama")
    page.screenshot(path=shots / "base.png", full_page=True)


def test_adapter_page_versions_metric_charts_and_alias_history(watched: Any, site: Site, shots: Path) -> None:
    page = watched
    log_in(page, site, next_path="/ui/adapters/org/alpha")
    page.screenshot(path=shots / "adapter.png", full_page=True)
    versions = api(site, "/v1/adapters/org/alpha/versions")["items"]
    assert values(page, "#versions tbody tr", "data-digest") == [v["digest"] for v in versions]
    for key in ("eval_loss", "accuracy"):
        points = page.locator(f"svg[data-chart='{key}'] circle.point")
        assert points.count() == len(versions)
        got = {int(n): float(v) for n, v in zip(values(page, f"svg[data-chart='{key}'] circle.point", "data-version"),
                                                values(page, f"svg[data-chart='{key}'] circle.point"), strict=True)}
        assert got == {v["version"]: v["metrics"][key] for v in versions}
        assert f"{key} = " in page.locator(f"svg[data-chart='{key}'] circle.point title").first.text_content()
    prod = api(site, "/v1/adapters/org/alpha/aliases/prod")
    staging = api(site, "/v1/adapters/org/alpha/aliases/staging")
    assert page.locator("#alias-history tbody tr").count() == len(prod["history"]) + len(staging["history"]) == 4
    assert page.locator("#versions tbody tr[data-version='2'] td").nth(3).text_content() == "more data"


def test_version_page_facts_files_and_an_inert_hostile_card(watched: Any, site: Site, shots: Path) -> None:
    page = watched
    log_in(page, site, next_path="/ui/adapters/org/alpha/versions/3")
    page.screenshot(path=shots / "version.png", full_page=True)
    v = api(site, "/v1/adapters/org/alpha/versions/3")
    assert page.text_content("#manifest-digest") == v["digest"]
    assert values(page, "#files tbody tr", "data-path") == [f["path"] for f in v["files"]]
    assert values(page, "#files td[data-size]", "data-size") == [str(f["size"]) for f in v["files"]]
    assert page.text_content("[data-fact=r]") == str(v["facts"]["r"])
    assert values(page, "#serving tbody tr", "data-engine") == sorted(v["facts"]["serving"])
    assert "loreg pull org/alpha:3" in page.text_content("#snippet-pull")
    assert 'PeftModel.from_pretrained(base, "./alpha")' in page.text_content("#snippet-peft")
    # the hostile card: rendered, but nothing of it runs or can run
    card = page.locator("#card")
    assert "Fine-tuned for support." in card.text_content()
    assert page.evaluate("window.__pwned") is None
    assert card.locator("script, img, iframe, [onclick], [onerror]").count() == 0
    assert card.locator("a[href^='javascript']").count() == 0
    assert all(h.startswith(("http://", "https://", "mailto:")) for h in values(page, "#card a", "href"))
    assert card.locator("td").count() <= 2000
    assert page.evaluate("window.__pwned") is None


def test_explain_page_charts_one_element_per_module(watched: Any, site: Site, shots: Path) -> None:
    page = watched
    log_in(page, site, next_path="/ui/adapters/org/alpha/versions/2/explain")
    page.screenshot(path=shots / "explain.png", full_page=True)
    result = api(site, "/v1/adapters/org/alpha/versions/2/inspect")
    key = "relative_change" if result["base_weights"] else "delta_norm"
    assert result["base_weights"]  # the base's weights are stored: the heatmap is relative
    cells = dict(zip(values(page, "svg.heatmap rect.cell", "data-module"), map(float, values(page, "svg.heatmap rect.cell")), strict=True))
    assert cells == {m["module"]: m[key] for m in result["modules"]}
    bars = dict(zip(values(page, "svg.bar-chart rect.bar", "data-module"), map(float, values(page, "svg.bar-chart rect.bar")), strict=True))
    assert bars == {m["module"]: float(m["effective_rank"]) for m in result["modules"]}
    assert page.locator("#modules tbody tr").count() == len(result["modules"]) == 4


def test_compare_page_shows_the_diff_apis_numbers(watched: Any, site: Site, shots: Path) -> None:
    page = watched
    log_in(page, site, next_path="/ui/adapters/org/alpha/versions/3")
    page.click("text=Compare with another version")
    page.wait_for_url("**/compare")
    assert page.input_value("input[name=other]") == "org/alpha:2"
    page.fill("input[name=other]", "org/alpha:1")
    page.click("form.filters button")
    page.wait_for_url("**/compare?other=**")
    page.screenshot(path=shots / "compare.png", full_page=True)
    diff = api(site, "/v1/adapters/org/alpha/versions/3/diff/org/alpha:1")
    for side in ("in", "out"):
        sel = f"svg[data-chart='similarity_{side}'] rect.cell"
        got = dict(zip(values(page, sel, "data-module"), map(float, values(page, sel)), strict=True))
        assert got == {m["module"]: m[f"similarity_{side}"] for m in diff["modules"]}
    rel = dict(zip(values(page, "#modules-diff tbody tr", "data-module"),
                   map(float, values(page, "#modules-diff td[data-field=relative_change]")), strict=True))
    assert rel == {m["module"]: m["relative_change"] for m in diff["modules"]}
    assert page.locator("#metrics-diff tr[data-key=eval_loss] td[data-value]").get_attribute("data-value") == repr(1.5 - 0.9)


def test_exports_page_shows_state_inputs_weights_and_files(watched: Any, site: Site, shots: Path) -> None:
    page = watched
    job = poll_until(lambda: (j := api(site, f"/v1/exports/{site.export_id}"))["state"] in ("done", "failed") and j,
                     "the export to finish", 300)
    log_in(page, site, next_path="/ui/exports")
    page.screenshot(path=shots / "exports.png", full_page=True)
    section = page.locator(f"#export-{site.export_id}")
    assert section.get_attribute("data-state") == job["state"] == "done"
    assert values(page, f"#export-{site.export_id} tr[data-input]", "data-input") == [
        f"{i['name']}:{i['version']}" for i in job["adapters"]
    ]
    assert list(map(float, values(page, f"#export-{site.export_id} tr[data-input]", "data-weight"))) == [1.0, 0.5]
    assert section.locator("td", has_text="model.safetensors").count() >= 1
    section.locator("a", has_text="org/alpha:2").click()
    page.wait_for_url("**/ui/adapters/org/alpha/versions/2")
    assert site.export_id[:12] in page.text_content("#lineage")


def test_a_namespace_limited_token_sees_only_its_namespaces(watched: Any, site: Site, shots: Path) -> None:
    page = watched
    log_in(page, site, site.org_reader)
    assert "team-b" not in page.content()
    page.goto(f"{site.url}/ui/search?q=secret")
    assert page.locator("#results tbody tr").count() == 0
    page.loreg_expected.append("the server responded with a status of 403")
    resp = page.goto(f"{site.url}/ui/adapters/team-b/secret")
    assert resp is not None and resp.status == 403
    assert "DENIED" in page.text_content("h1")
    page.screenshot(path=shots / "denied.png", full_page=True)
    visible = {r["name"] for r in api(site, "/v1/adapters", site.org_reader)["items"]}
    page.goto(f"{site.url}/ui/search")
    assert set(values(page, "#results tbody tr", "data-name")) == visible == {"org/alpha", "org/beta"}
    page.click("header button")  # log out
    page.wait_for_url("**/ui/login")
    assert page.goto(f"{site.url}/ui").url.startswith(f"{site.url}/ui/login")
    page.screenshot(path=shots / "login.png", full_page=True)


PAGES = ["/ui", "/ui/search", "/ui/bases/loreg-test/tiny-llama", "/ui/adapters/org/alpha", "/ui/adapters/org/alpha/versions/3",
         "/ui/adapters/org/alpha/versions/2/explain", "/ui/adapters/org/alpha/versions/3/compare?other=org/alpha:2", "/ui/exports"]


def test_every_link_leads_to_a_page_that_answers(watched: Any, site: Site) -> None:
    page = watched
    log_in(page, site)
    links: set[str] = set()
    for path in PAGES:
        page.goto(f"{site.url}{path}")
        links |= set(page.eval_on_selector_all("main a[href], header a[href]", "els => els.map(e => e.href)"))
    ours = sorted(u for u in links if u.startswith(f"{site.url}/ui"))
    assert len(ours) >= 12
    for url in ours:  # fetched with the page's cookies, not rendered: the links' targets answer
        resp = page.request.get(url)
        assert resp.status == 200, url
        assert resp.headers["content-type"].startswith("text/html") and "<h1>" in resp.text(), url
        assert "error-message" not in resp.text(), url
    # a link says where it goes: each version link lands on that version
    page.goto(f"{site.url}/ui/adapters/org/alpha")
    page.click("#versions a >> text='1'")
    assert page.text_content("h1").replace(" ", "") == "org/alpha:1"


@pytest.mark.parametrize("path", ["/ui", "/ui/adapters/org/alpha", "/ui/adapters/org/alpha/versions/3"])
def test_the_keyboard_reaches_every_link(watched: Any, site: Site, path: str) -> None:
    page = watched
    log_in(page, site, next_path=quote(path))
    hrefs = set(page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"))
    reached: set[str] = set()
    for _ in range(400):
        page.keyboard.press("Tab")
        href = page.evaluate("document.activeElement && document.activeElement.href || null")
        if href:
            reached.add(href)
        if reached >= hrefs:
            break
    assert hrefs and hrefs <= reached
