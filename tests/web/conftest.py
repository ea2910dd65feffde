"""A real `loreg serve` with pushed adapters, an export and tokens, and Debian's Chromium driven by
Playwright (its own browser download cannot reach the internet here).

One server per module, one browser per session; each test gets a fresh browser context (cookies).
Every page a test opens is watched: a console error, an uncaught script error or a dialog fails it.
Screenshots go to $LOREG_TEST_ARTIFACTS/screenshots (default: the session's temporary folder).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import factories
from tests.support.adapters import variant
from tests.support.server import env_with, serving, token_for

HOSTILE_CARD = (
    "# Alpha v3\n\nFine-tuned for support.\n\n<script>window.__pwned = 1; alert(1)</script>\n\n"
    "<img src=x onerror=\"window.__pwned = 2\">\n\n[click me](javascript:window.__pwned=3)\n\n"
    "<a href=\"javascript:alert(4)\" onclick=\"window.__pwned = 5\">x</a>\n\n"
    "| epoch | loss |\n|---|---|\n" + "".join(f"| {i} | {1 / (i + 1):.3f} |\n" for i in range(3000))
    + "\n" + "- " * 2000 + "deep\n"
)


@dataclass
class Site:
    url: str
    admin: str
    org_reader: str  # a read token limited to the namespace org
    export_id: str
    root: Path
    facts: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is missing: scripts/test.sh installs it (apt-get install -y chromium)")
    return {**browser_type_launch_args, "executable_path": chromium}


@pytest.fixture(scope="session")
def base_url() -> None:
    """pytest-base-url's own fixture warns on this pytest (the warning is an error here); pages use full URLs."""
    return None


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = os.environ.get("LOREG_TEST_ARTIFACTS")
    folder = Path(root) / "screenshots" if root else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_llama: dict[str, Path]) -> Iterator[Site]:
    from loreg.cli.client import RegistryClient

    root = tmp_path_factory.mktemp("web-site")
    home = root / "home"
    with serving(env_with(LOREG_HOME=str(home)), root) as (url, _proc):
        admin = token_for(home, url)
        with RegistryClient(url, admin) as c:
            c.register_base(tiny_llama["base"], factories.base_name("llama"), upload_weights=True)
            one = tiny_llama["adapter"]
            c.push(one, "org/alpha", metrics={"eval_loss": 1.5, "accuracy": 0.61}, aliases=["prod"], message="baseline")
            c.push(variant(one, root / "a2", 2), "org/alpha", metrics={"eval_loss": 1.2, "accuracy": 0.66},
                   aliases=["prod", "staging"], message="more data")
            three = variant(one, root / "a3", 3)
            (three / "README.md").write_text(HOSTILE_CARD)
            c.push(three, "org/alpha", metrics={"eval_loss": 0.9, "accuracy": 0.71}, aliases=["prod"], message="longer run")
            beta = factories.make_adapter(root / "beta", "llama", base_dir=tiny_llama["base"], r=4, target_modules=["q_proj"])
            c.push(beta, "org/beta", metrics={"eval_loss": 1.3})
            c.push(variant(one, root / "s1", 9), "team-b/secret", metrics={"eval_loss": 0.2}, message="hidden")
            # queued, not awaited: the merge runs in the server while the other tests browse
            job = c.request("POST", "/v1/exports", json={"adapters": [
                {"ref": "org/alpha:1", "weight": 1.0}, {"ref": "org/alpha:2", "weight": 0.5}]}).json()
            reader = c.request("POST", "/v1/tokens", json={"scope": "read", "namespaces": ["org"]}).json()["token"]
        yield Site(url=url, admin=admin, org_reader=reader, export_id=job["id"], root=root)


@pytest.fixture
def watched(page: Any) -> Iterator[Any]:
    """``page``, failing the test on any console error, uncaught error or dialog (alert, confirm)."""
    problems: list[str] = []
    page.loreg_expected = []  # console errors a test causes on purpose (a 403 page logs one)
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def dialog(d: Any) -> None:
        problems.append(f"dialog {d.type}: {d.message}")
        d.dismiss()

    page.on("dialog", dialog)
    yield page
    assert [p for p in problems if not any(e in p for e in page.loreg_expected)] == []


def log_in(page: Any, site: Site, token: str | None = None, next_path: str = "/ui") -> None:
    page.goto(f"{site.url}/ui/login?next={next_path}")
    page.fill("input[name=token]", token or site.admin)
    page.click("form.login button[type=submit]")
    page.wait_for_url(f"{site.url}{next_path}")
