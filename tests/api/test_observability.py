"""What an operator sees: GET /metrics after known traffic, and a request id on every response."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

ADAPTER_ROUTE = "/v1/adapters/{namespace}/{name}"


def scrape(http: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = http.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_known_traffic_by_route_template(api: TestClient) -> None:
    before = scrape(api)
    sent = 0
    for i in range(40):
        resp = api.get(f"/v1/adapters/org/missing-{i}")
        assert resp.status_code == 404
        sent += len(resp.content)
    body = b'{"files": "not a list"}'
    refused = api.post("/v1/adapters/org/x/versions", content=body, headers={"Content-Type": "application/json"})
    assert refused.status_code == 400
    after = scrape(api)

    assert delta(before, after, "loreg_http_requests_total", method="GET", route=ADAPTER_ROUTE, status="404") == 40
    assert delta(before, after, "loreg_http_request_duration_seconds_count", method="GET", route=ADAPTER_ROUTE) == 40
    assert delta(before, after, "loreg_http_sent_bytes_total", route=ADAPTER_ROUTE) == sent
    versions = "/v1/adapters/{namespace}/{name}/versions"
    assert delta(before, after, "loreg_http_requests_total", method="POST", route=versions, status="400") == 1
    assert delta(before, after, "loreg_http_received_bytes_total", route=versions) == len(body)
    # the first scrape is counted in the second: one request to /metrics, answered 200
    assert delta(before, after, "loreg_http_requests_total", method="GET", route="/metrics", status="200") == 1
    # forty names, one series: labels are templates, never the raw path
    labels = {value for (_, items) in after for _, value in items}
    assert not any("missing-" in value for value in labels)
    def series(scraped: Any) -> set[Any]:
        return {items for name, items in scraped if name == "loreg_http_requests_total" and ("route", ADAPTER_ROUTE) in items}

    # other tests of this process may have added series for this route (other statuses); these forty
    # requests add at most the one (GET, 404) series
    new = series(after) - series(before)
    assert len(new) <= 1 and all(("status", "404") in items for items in new)
    assert len(series(after)) <= len(series(before)) + 1


def test_unmatched_paths_share_one_series(api: TestClient) -> None:
    before = scrape(api)
    for i in range(25):
        assert api.get(f"/no/such/path-{i}").status_code == 404
    after = scrape(api)
    assert delta(before, after, "loreg_http_requests_total", method="GET", route="<unmatched>", status="404") == 25
    new = {items for name, items in after.keys() - before.keys() if name == "loreg_http_requests_total"}
    assert new <= {(("method", "GET"), ("route", "<unmatched>"), ("status", "404"))}


def test_metrics_report_export_jobs_from_the_database(
    api: TestClient, bare_client: Any, registry: Any, tiny_llama: dict[str, Any]
) -> None:
    from loreg.registry.merge.worker import ExportWorker
    from tests import factories

    bare_client.register_base(tiny_llama["base"], factories.base_name("llama"), upload_weights=True)
    bare_client.push(tiny_llama["adapter"], "org/a")
    assert api.post("/v1/exports", json={"adapters": [{"ref": "org/a:1"}]}).status_code == 202
    queued = scrape(api)
    assert queued[("loreg_export_jobs", (("state", "queued"),))] == 1
    assert queued[("loreg_export_jobs", (("state", "done"),))] == 0
    assert ExportWorker(registry, device="cpu").run_once()
    done = scrape(api)
    assert done[("loreg_export_jobs", (("state", "queued"),))] == 0
    assert done[("loreg_export_jobs", (("state", "done"),))] == 1
    assert done[("loreg_export_job_duration_seconds_count", (("outcome", "done"),))] == 1
    assert done[("loreg_export_job_duration_seconds_count", (("outcome", "failed"),))] == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_metrics_need_the_admin_token_unless_public(app: Any, anon: TestClient, make_token: Any) -> None:
    assert anon.get("/metrics").status_code == 401
    reader = anon.get("/metrics", headers={"Authorization": f"Bearer {make_token('read')}"})
    assert reader.status_code == 403 and reader.json()["errors"][0]["code"] == "DENIED"
    app.state.settings.metrics_public = True
    try:
        assert anon.get("/metrics").status_code == 200
    finally:
        app.state.settings.metrics_public = False


def test_every_response_carries_a_request_id(api: TestClient) -> None:
    ok = api.get("/v1/health")
    generated = ok.headers["x-request-id"]
    assert len(generated) == 32 and generated != api.get("/v1/health").headers["x-request-id"]
    assert api.get("/v1/health", headers={"X-Request-ID": "lb-7f3a.01_x"}).headers["x-request-id"] == "lb-7f3a.01_x"
    for insane in ("a" * 129, "has space", "semi;colon", ""):
        echoed = api.get("/v1/health", headers={"X-Request-ID": insane}).headers["x-request-id"]
        assert echoed != insane and len(echoed) == 32


def test_error_envelopes_carry_the_request_id(api: TestClient, anon: TestClient) -> None:
    missing = api.get("/v1/adapters/org/nothing", headers={"X-Request-ID": "trace-1"})
    assert missing.status_code == 404
    assert missing.json()["request_id"] == "trace-1" and missing.headers["x-request-id"] == "trace-1"
    refused = anon.get("/v1/adapters")  # refused before any route runs its code
    assert refused.status_code == 401
    assert refused.json()["request_id"] == refused.headers["x-request-id"]
    too_large = api.post("/v1/adapters/org/x/versions", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert too_large.status_code == 413
    assert too_large.json()["request_id"] == too_large.headers["x-request-id"]


def test_gc_and_fsck_results_are_scraped(api: TestClient, registry: Any) -> None:
    from loreg.registry.services.maintenance import MaintenanceService

    stray = b"an object no row names (a crash between the store write and the row)"
    digest = "sha256:" + hashlib.sha256(stray).hexdigest()
    registry.store.put(io.BytesIO(stray), digest, len(stray))
    before = scrape(api)
    service = MaintenanceService(registry)
    report = service.gc(grace=timedelta(0))
    checked = service.fsck()
    after = scrape(api)
    assert report.stray_deleted == [digest]
    assert delta(before, after, "loreg_gc_deleted_blobs_total") == 1
    assert delta(before, after, "loreg_gc_freed_bytes_total") == len(stray)
    assert after[("loreg_gc_last_run_timestamp_seconds", ())] > before.get(("loreg_gc_last_run_timestamp_seconds", ()), 0)
    assert after[("loreg_fsck_checked_blobs", ())] == checked.checked
    assert after[("loreg_fsck_bad_blobs", (("kind", "corrupt"),))] == 0
    assert after[("loreg_fsck_last_run_timestamp_seconds", ())] > 0
