"""The HTTP routes, one APIRouter per resource: operations (probes, metrics, info), rerank, answer and
retrieve, documents. ``MODEL_ENDPOINTS`` are the endpoints that queue work for the model worker, which
admission control guards (service.api.admission)."""

from service.api.routes import answer, documents, operations, rerank

ROUTERS = (operations.probes, operations.router, rerank.router, answer.router, documents.router)
MODEL_ENDPOINTS = (*rerank.MODEL_ENDPOINTS, *answer.MODEL_ENDPOINTS, *documents.MODEL_ENDPOINTS)
