"""Combinations: combine adapter versions (PEFT's methods) into the next version of an adapter; poll."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loreg.registry.api.schemas import CombinationCreate, CombinationPublic
from loreg.registry.api.deps import ReadDep, WriteDep
from loreg.registry.formats import names
from loreg.registry.merge.combine import CombineParams
from loreg.registry.services.combinations import CombinationService
from loreg.registry.services.exports import WeightedRef

router = APIRouter(tags=["combinations"])


def _svc(request: Request) -> CombinationService:
    return request.app.state.combinations


@router.post(
    "/v1/combinations", response_model=CombinationPublic, status_code=202, responses={200: {"model": CombinationPublic}}
)
def create_combination(body: CombinationCreate, request: Request, principal: WriteDep) -> JSONResponse:
    """Queue a combination of versions the token can read into the next version of ``to``, which it must
    be able to write (202 with the job); an identical request answers its stored job (200 once done).
    Refusals (different bases, unequal ranks for the factor-wise methods, bad parameters, DoRA) come
    before anything is stored."""
    for a in body.inputs:
        ref = names.parse_reference(a.ref)
        principal.require("read", ref.namespace, ref.name)
    namespace, _, name = body.to.partition("/")
    names.check_name(namespace, name)
    principal.require("write", namespace, name)
    params = CombineParams(
        method=body.method, weights=tuple(a.weight for a in body.inputs), density=body.density,
        majority_sign_method=body.majority_sign_method, svd_rank=body.svd_rank, svd_clamp=body.svd_clamp,
        seed=body.seed,
    )
    answer = _svc(request).request(
        [WeightedRef(ref=a.ref, weight=a.weight) for a in body.inputs], params, body.to, body.aliases, principal
    )
    out = CombinationPublic.model_validate(answer.combination)
    return JSONResponse(out.model_dump(mode="json"), status_code=200 if out.state == "done" else 202)


@router.get("/v1/combinations/{combination_id}", response_model=CombinationPublic)
def get_combination(combination_id: str, request: Request, principal: ReadDep) -> CombinationPublic:
    """State (queued, running, done with the pushed version, failed with the reason) and the request."""
    return CombinationPublic.model_validate(_svc(request).get(combination_id, principal))
