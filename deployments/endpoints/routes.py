"""`/v1/llm/model-endpoints` routes, as Scale's server has them; the ingress includes this router.

The `EndpointService` is on `app.state.endpoints` (the Ingress puts it there when it starts). Errors
are `ServingError`s, which the ingress's one handler renders (`{"detail": ...}` with their status).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from deployments.endpoints.service import EndpointService
from deployments.endpoints.wire import (
    CreateLLMEndpointRequest,
    CreateLLMEndpointResponse,
    DeleteLLMEndpointResponse,
    UpdateLLMEndpointRequest,
    UpdateLLMEndpointResponse,
)
from deployments.openapi_responses import LLM_ENGINE_LIST, LLM_ENGINE_LOOKUP, llm_engine_errors
from deployments.protocol.llm_engine import ListModelEndpointsResponse, ModelEndpoint

router = APIRouter(prefix="/v1/llm/model-endpoints")
# 400: the message names the field and the limit; 413: a body over limits.max_body_bytes (the guard)
CREATE_ERRORS = llm_engine_errors(400, 401, 413)
UPDATE_ERRORS = llm_engine_errors(400, 401, 404, 413)
DELETE_ERRORS = llm_engine_errors(400, 401, 404)


def _service(request: Request) -> EndpointService:
    return request.app.state.endpoints


@router.post("", response_model=CreateLLMEndpointResponse, responses=CREATE_ERRORS)
async def create_model_endpoint(
    body: CreateLLMEndpointRequest, request: Request
) -> CreateLLMEndpointResponse:
    """Create an endpoint (`Model.create`): 200 with status UPDATE_PENDING, then READY or UPDATE_FAILED."""
    return await _service(request).create(body)


@router.get("", response_model=ListModelEndpointsResponse, responses=LLM_ENGINE_LIST)
async def list_model_endpoints(request: Request) -> ListModelEndpointsResponse:
    """Configured models and runtime endpoints (`Model.list`)."""
    return await _service(request).list()


@router.get("/{model_endpoint_name}", response_model=ModelEndpoint, responses=LLM_ENGINE_LOOKUP)
async def get_model_endpoint(model_endpoint_name: str, request: Request) -> ModelEndpoint:
    """One endpoint (`Model.get`); 404 if unknown."""
    return await _service(request).get(model_endpoint_name)


@router.put("/{model_endpoint_name}", response_model=UpdateLLMEndpointResponse, responses=UPDATE_ERRORS)
async def update_model_endpoint(
    model_endpoint_name: str, body: UpdateLLMEndpointRequest, request: Request
) -> UpdateLLMEndpointResponse:
    """Change scaling (in place) or resources (rolling restart) of a runtime endpoint (`Model.update`)."""
    return await _service(request).update(model_endpoint_name, body)


@router.delete("/{model_endpoint_name}", response_model=DeleteLLMEndpointResponse, responses=DELETE_ERRORS)
async def delete_model_endpoint(model_endpoint_name: str, request: Request) -> DeleteLLMEndpointResponse:
    """Delete a runtime endpoint (`Model.delete`): 404 from now on; in-flight requests drain."""
    return await _service(request).delete(model_endpoint_name)
