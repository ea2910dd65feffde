"""schemathesis against the app's own OpenAPI document, in process (ASGI), bounded.

Every operation gets a few generated requests as admin on a registry holding one adapter version;
no answer may be a 5xx, documented answers must match their schema, and every operation that
declares bearer auth must refuse a request without it (ignored_auth). schemathesis' pytest
integration (``from_fixture``) does not run under pytest 9, so the operations are walked here and
each one's case strategy is driven by Hypothesis directly.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import ignored_auth, not_a_server_error, response_schema_conformance

from loreg.registry.api.ratelimit import FailureLimiter
from tests.security.conftest import Pusher

EXAMPLES_PER_OPERATION = 10
SEEDED = {"namespace": "org", "name": "x", "ref": "loreg-test/tiny-llama"}


@pytest.mark.slow
def test_api_never_answers_5xx(app: Any, pusher: Pusher, admin_token: str) -> None:
    assert pusher.push("org/x", aliases=["prod"]).status_code == 201
    app.state.auth_limiter = FailureLimiter(10**6, 300.0)  # generated headers may carry bad tokens
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    auth = {"Authorization": f"Bearer {admin_token}"}
    failures: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        # once with every parameter generated, once with the path pinned to the stored adapter so
        # that generated bodies and queries reach the services behind the name checks
        params = {p.name for p in operation.path_parameters}
        pinned = {k: v for k, v in SEEDED.items() if k in params}
        passes = [("free", operation.as_strategy())]
        if pinned:
            passes.append(("pinned", operation.as_strategy(path_parameters=pinned)))
        for label, strategy in passes:

            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(strategy)
            def run(case: Any) -> None:
                case.call_and_validate(headers=auth, checks=[not_a_server_error, response_schema_conformance, ignored_auth])

            try:
                run()
            except Exception as exc:  # collect every operation's failure, then fail once
                failures[f"{operation.label} ({label})"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
    assert operations >= 25
    assert failures == {}, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
