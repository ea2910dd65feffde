"""The read-only web interface under /ui: pages rendered on the server from the API's own services.

Each page calls the service its API route calls, with the same principal and the same namespace
rules (lookups pass the token's globs to SQL, versions and exports go through the same checks), so a
page never shows what the API would hide. No form changes state but login and logout.
"""

from __future__ import annotations

import math
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from loreg.registry.errors import RequestInvalidError
from loreg.registry.formats import names
from loreg.registry.services.adapters import LookupFilters, default_order
from loreg.registry.services.diff import diff_versions
from loreg.registry.services.tokens import Principal
from loreg.registry.web import card, charts
from loreg.registry.web.auth import COOKIE, PREFIX, LoginRequired, UiPermission, authenticate, read_form, safe_next, same_origin

router = APIRouter(include_in_schema=False)
UI_READ = UiPermission("read")
UI_PUBLIC = UiPermission(None)
Viewer = Annotated[Principal, Depends(UI_READ)]
Anyone = Annotated[Principal | None, Depends(UI_PUBLIC)]
PAGE_SIZE = 50
MAX_CHART_VERSIONS = 200

# query fields of the search form: (kind, bound), parsed like the lookup API's query (empty = absent)
SEARCH_FIELDS: dict[str, tuple[str, int]] = {
    "q": ("str", 200), "namespace": ("str", 64), "base": ("str", 300), "target": ("str", 128),
    "min_rank": ("int", 1 << 20), "max_rank": ("int", 1 << 20), "dora": ("bool", 0), "task_type": ("str", 64),
    "metric": ("str", 128), "metric_min": ("float", 0), "metric_max": ("float", 0), "order": ("order", 0),
    "cursor": ("str", 200), "limit": ("int", 200),
}


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    env = request.app.state.ui_templates
    principal = getattr(request.state, "principal", None)
    html = env.get_template(template).render(request=request, principal=principal, prefix=PREFIX, **context)
    return HTMLResponse(html, status_code=status)


def parse_search(request: Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (kind, bound) in SEARCH_FIELDS.items():
        raw = request.query_params.get(key, "").strip()
        if not raw:
            continue
        try:
            if kind == "str":
                if len(raw) > bound:
                    raise ValueError(f"at most {bound} characters")
                out[key] = raw
            elif kind == "int":
                value = int(raw) if raw.isdigit() else _fail("a whole number")
                if not 0 <= value <= bound or (key == "limit" and value < 1):
                    raise ValueError(f"between {int(key == 'limit')} and {bound}")
                out[key] = value
            elif kind == "float":
                value = _number(raw)
                if not math.isfinite(value):
                    raise ValueError("a finite number")
                out[key] = value
            elif kind == "bool":
                out[key] = {"true": True, "false": False}[raw.lower()]
            elif raw in ("asc", "desc"):
                out[key] = raw
            else:
                raise ValueError("asc or desc")
        except (ValueError, KeyError) as exc:
            raise RequestInvalidError(f"{key}: {exc or 'true or false'}", detail={"field": key}) from None
    return out


def _fail(what: str) -> Any:
    raise ValueError(what)


def _number(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("a number") from None


def lookup(request: Request, principal: Principal, params: dict[str, Any], *, base: str | None = None) -> Any:
    """The page of versions GET /v1/adapters answers for the same query and token."""
    state = request.app.state
    if params.get("namespace") is not None:
        principal.require("read", params["namespace"])
    filters = LookupFilters(
        namespace=params.get("namespace"), base=base or params.get("base"), target=params.get("target"),
        min_rank=params.get("min_rank"), max_rank=params.get("max_rank"), dora=params.get("dora"),
        task_type=params.get("task_type"), metric=params.get("metric"), metric_min=params.get("metric_min"),
        metric_max=params.get("metric_max"), order=params.get("order"), q=params.get("q"),
        allowed=tuple(principal.namespaces) or None,
    )
    return state.adapters.lookup(filters, cursor=params.get("cursor"), limit=params.get("limit", PAGE_SIZE))


def query_with(params: dict[str, Any], **changes: Any) -> str:
    """The query string of ``params`` with ``changes`` (None removes a field): links for sort and pages."""
    merged = {**params, **changes}
    return urlencode({k: str(v).lower() if isinstance(v, bool) else v for k, v in merged.items() if v is not None})


@router.get("/")
def root(_p: Anyone) -> RedirectResponse:
    return RedirectResponse(PREFIX, status_code=307)


@router.get(PREFIX)
def home(request: Request, principal: Viewer) -> HTMLResponse:
    state = request.app.state
    bases = state.browse.base_counts(principal)
    recent = state.adapters.lookup(
        LookupFilters(latest_only=False, allowed=tuple(principal.namespaces) or None), limit=20
    )
    return render(request, "home.html", bases=bases, recent=recent)


@router.get(f"{PREFIX}/search")
def search(request: Request, principal: Viewer) -> HTMLResponse:
    params = parse_search(request)
    page = lookup(request, principal, params)
    return render(request, "search.html", params=params, page=page, query_with=query_with, order=_order(params))


def _order(params: dict[str, Any]) -> str:
    return params.get("order") or default_order(params.get("metric"))


@router.get(PREFIX + "/bases/{ref:path}")
def base_page(ref: str, request: Request, principal: Viewer) -> HTMLResponse:
    state = request.app.state
    base = state.bases.get(ref)
    config = state.bases.layout(ref).config
    params = parse_search(request)
    params.pop("base", None)
    page = lookup(request, principal, params, base=ref)
    facts = {
        "model type": base.model_type,
        "architectures": ", ".join(base.architectures) or None,
        "layers": config.get("num_hidden_layers", config.get("n_layer")),
        "hidden size": config.get("hidden_size", config.get("n_embd")),
        "dtype": config.get("torch_dtype", config.get("dtype")),
        "parameters": base.parameter_count,
        "tensors": base.tensor_count,
        "weights stored": "yes" if base.weights_uploaded else "no (headers only)",
    }
    return render(
        request, "base.html", ref=ref, base=base, facts=facts, params=params, page=page, query_with=query_with,
        order=_order(params),
    )


@router.get(PREFIX + "/adapters/{namespace}/{name}")
def adapter_page(namespace: str, name: str, request: Request, _p: Viewer) -> HTMLResponse:
    state = request.app.state
    names.parse_reference(f"{namespace}/{name}")
    cursor = parse_search(request).get("cursor")
    page = state.adapters.versions(namespace, name, cursor=cursor, limit=PAGE_SIZE)
    story = state.browse.adapter_story(namespace, name, [v.version for v in page.items])
    series: dict[str, list[tuple[int, float]]] = {}
    for v in page.items[:MAX_CHART_VERSIONS]:
        for key, value in v.metrics.items():
            series.setdefault(key, []).append((v.version, value))
    charts_ = {key: charts.line_chart(key, points) for key, points in sorted(series.items())}
    return render(
        request, "adapter.html", full=f"{namespace}/{name}", namespace=namespace, name=name, page=page,
        story=story, series=series, charts=charts_,
    )


@router.get(PREFIX + "/adapters/{namespace}/{name}/versions/{tag}")
def version_page(namespace: str, name: str, tag: str, request: Request, principal: Viewer) -> HTMLResponse:
    state = request.app.state
    version = state.adapters.get(namespace, name, tag)
    exports = state.exports.for_version(namespace, name, tag, principal)
    text, cut = state.browse.card(version.files, card.MAX_CARD_BYTES)
    facts = version.facts
    config = [
        ("r", facts.get("r")), ("lora_alpha", facts.get("lora_alpha")), ("ranks", facts.get("ranks")),
        ("rsLoRA", facts.get("use_rslora")), ("DoRA", facts.get("use_dora")), ("targets", facts.get("targets")),
        ("modules_to_save", facts.get("modules_to_save")), ("task type", facts.get("task_type")),
        ("dtype", facts.get("dtype")), ("parameters", facts.get("parameter_count")), ("size", version.size),
        ("modules", len(facts.get("modules", []))),
    ]
    ref = f"{version.name}:{version.version}"
    base_name = version.base.names[0] if version.base and version.base.names else "<base model>"
    return render(
        request, "version.html", v=version, ref=ref, config=config, serving=facts.get("serving", {}),
        exports=exports, card_html=card.render(text) if text is not None else None, card_cut=cut, base_name=base_name,
        local=name,
    )


@router.get(PREFIX + "/adapters/{namespace}/{name}/versions/{tag}/explain")
def explain_page(namespace: str, name: str, tag: str, request: Request, _p: Viewer) -> HTMLResponse:
    result = request.app.state.inspect.inspect(namespace, name, tag)
    modules = result["modules"]
    relative = result["base_weights"] and any(m.get("relative_change") is not None for m in modules)
    key = "relative_change" if relative else "delta_norm"
    cells = []
    for m in modules:
        layer, kind = charts.layer_and_kind(m["module"])
        cells.append(charts.Cell(layer, kind, m.get(key), m["module"]))
    label = "‖ΔW‖ / ‖W‖" if relative else "‖ΔW‖_F"
    heat = charts.heatmap(cells, title=f"{label} by layer and module", name=key) if cells else None
    ordered = sorted(modules, key=lambda m: charts.layer_and_kind(m["module"])[::-1] + (m["module"],))
    ranks = charts.bar_chart(
        [(m["module"], float(m["effective_rank"]), float(m["rank"])) for m in ordered],
        title="effective rank per module (of r)", name="effective_rank",
    ) if modules else None
    return render(
        request, "explain.html", result=result, modules=modules, heat=heat, ranks=ranks, label=label, key=key,
        full=f"{namespace}/{name}", tag=tag,
    )


@router.get(PREFIX + "/adapters/{namespace}/{name}/versions/{tag}/compare")
def compare_page(namespace: str, name: str, tag: str, request: Request, principal: Viewer) -> HTMLResponse:
    """Two versions side by side: config and metrics, and per module how far the second moved from the first."""
    state = request.app.state
    first = state.adapters.get(namespace, name, tag)
    other = request.query_params.get("other", "").strip()[:300]
    if not other:
        suggestion = f"{first.name}:{first.version - 1}" if first.version > 1 else first.name
        return render(request, "compare.html", first=first, second=None, other=suggestion)
    ref = names.parse_reference(other)
    principal.require("read", ref.namespace, ref.name)
    second = state.adapters.get(ref.namespace, ref.name, ref.tag)
    result = diff_versions(state.adapters, principal, f"{first.name}@{first.digest}", f"{second.name}@{second.digest}")
    heat = {}
    for side in ("in", "out"):
        cells = []
        for m in result.modules:
            layer, kind = charts.layer_and_kind(m.module)
            cells.append(charts.Cell(layer, kind, getattr(m, f"similarity_{side}"), m.module))
        label = "input side (rows of lora_A)" if side == "in" else "output side (columns of lora_B)"
        heat[side] = (
            charts.heatmap(cells, title=f"subspace similarity, {label}", name=f"similarity_{side}", domain=(0.0, 1.0))
            if cells else None
        )
    keys = ["r", "lora_alpha", "use_rslora", "use_dora", "targets", "modules_to_save", "task_type", "dtype", "parameter_count"]
    config = [(k, first.facts.get(k), second.facts.get(k)) for k in keys] + [("size", first.size, second.size)]
    metrics = sorted(set(first.metrics) | set(second.metrics))
    return render(
        request, "compare.html", first=first, second=second, other=other, result=result, heat=heat, config=config,
        metrics=metrics,
    )


@router.get(PREFIX + "/exports")
def exports_page(request: Request, principal: Viewer) -> HTMLResponse:
    return render(request, "exports.html", exports=request.app.state.exports.recent(principal))


@router.get(PREFIX + "/login")
def login_form(request: Request, _p: Anyone) -> HTMLResponse:
    return render(request, "login.html", next=safe_next(request.query_params.get("next")),
                  reason=request.query_params.get("reason", "")[:200])


@router.post(PREFIX + "/login")
async def login(request: Request, _p: Anyone) -> Response:
    same_origin(request)
    form = await read_form(request)
    target = safe_next(form.get("next"))
    token = form.get("token", "").strip()
    try:
        await authenticate(request, token, target)
    except LoginRequired as exc:
        return render(request, "login.html", status=401, next=target, reason=exc.reason or "invalid token")
    resp = RedirectResponse(target, status_code=303)
    resp.set_cookie(
        COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https", path=PREFIX,
        max_age=12 * 3600,
    )
    return resp


@router.post(PREFIX + "/logout")
def logout(request: Request, _p: Anyone) -> RedirectResponse:
    same_origin(request)
    resp = RedirectResponse(f"{PREFIX}/login", status_code=303)
    resp.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return resp
