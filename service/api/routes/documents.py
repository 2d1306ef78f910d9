"""``POST /documents`` (upsert), ``GET`` and ``DELETE /documents/{id}``."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException

from service.api.dependencies import (
    API_ERRORS,
    MODEL_ERRORS,
    NOT_FOUND,
    WRITE_ERRORS,
    AppRuntime,
    AppSettings,
    ReadyPipeline,
    authenticate,
    require_write,
)
from service.api.request_limits import check_upsert
from service.api.schemas.documents import (
    DeleteResponse,
    DocumentIn,
    DocumentOut,
    DocumentsUpsert,
    UpsertResponse,
)
from service.storage.document_store import NewDocument, content_id

router = APIRouter(tags=["documents"], dependencies=[Depends(authenticate)], responses=API_ERRORS)


@router.post("/documents", dependencies=[Depends(require_write)], responses={**MODEL_ERRORS, **WRITE_ERRORS})
async def upsert_documents(
    body: Annotated[
        list[DocumentIn] | DocumentsUpsert,
        Body(description='A list of documents, or {"documents": [...]}; an existing id is replaced.'),
    ],
    pipeline: ReadyPipeline,
    runtime: AppRuntime,
    settings: AppSettings,
) -> UpsertResponse:
    """Add or replace documents. Acknowledged only after the SQLite commit and the index file replace."""
    items = body.documents if isinstance(body, DocumentsUpsert) else body
    given = [NewDocument(d.id or content_id(d.title, d.text), d.title, d.text, d.metadata) for d in items]
    documents = check_upsert(given, settings)
    await runtime.worker.run(pipeline.upsert, documents)
    return UpsertResponse(
        upserted=len(documents), ids=[d.id for d in documents], documents_indexed=len(pipeline.index)
    )


@router.get("/documents/{doc_id:path}", responses=NOT_FOUND)
async def get_document(doc_id: str, pipeline: ReadyPipeline) -> DocumentOut:
    document = await asyncio.to_thread(pipeline.index.get, doc_id)
    if document is None:
        raise HTTPException(404, f"no document with id {doc_id!r}")
    return DocumentOut(id=document.id, title=document.title, text=document.text, metadata=document.metadata)


@router.delete(
    "/documents/{doc_id:path}",
    dependencies=[Depends(require_write)],
    responses={**NOT_FOUND, **WRITE_ERRORS, 429: MODEL_ERRORS[429], 504: MODEL_ERRORS[504]},
)
async def delete_document(doc_id: str, pipeline: ReadyPipeline, runtime: AppRuntime) -> DeleteResponse:
    if not await runtime.worker.run(pipeline.delete, doc_id):
        raise HTTPException(404, f"no document with id {doc_id!r}")
    return DeleteResponse(deleted=doc_id, documents_indexed=len(pipeline.index))


MODEL_ENDPOINTS = (upsert_documents, delete_document)
