"""Build the demo index: every distinct paragraph of the shipped HotpotQA splits, embedded and stored.

    python -m service.storage.build_index [--if-missing] [--limit N]

Writes the SQLite store and the FAISS file to ``GRERANK_INDEX_DIR`` (or, with ``GRERANK_STORE_URL``, the
documents to that PostgreSQL store, which every replica then follows) with the configured embedder
(``GRERANK_EMBEDDER``), through the same :class:`DocumentIndex` the service writes with. Paragraph ids are
``hotpot-<hash of title and text>``, stable across rebuilds; the title is kept in the metadata too.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch

from grerank import qa_data
from grerank.passage import Passage
from service.engine.models import load_embedder, resolve_bf16, resolve_device
from service.settings import Settings
from service.storage.document_index import INDEX_FILE, DocumentIndex
from service.storage.document_store import NewDocument, content_id
from service.storage.postgres_store import PostgresStore

log = logging.getLogger(__name__)


def hotpot_documents(passages: Sequence[Passage]) -> list[NewDocument]:
    return [
        NewDocument(content_id(p.title, p.text, "hotpot"), p.title, p.text, {"source": "hotpotqa"})
        for p in passages
    ]


def index_exists(settings: Settings) -> bool:
    if settings.store_url:
        store = PostgresStore(settings.store_url)
        try:
            return store.count() > 0
        finally:
            store.close()
    folder = settings.index_dir
    return (folder / INDEX_FILE).is_file() and (folder / "documents.sqlite3").is_file()


def build_index(
    settings: Settings, passages: Sequence[Passage], progress: bool = True, chunk: int = 2048
) -> int:
    """Embed and upsert ``passages`` into ``settings.index_dir``; returns the number of documents indexed."""
    device = resolve_device(settings.device)
    bf16 = resolve_bf16(settings.precision, device)
    embedder, source = load_embedder(settings, device)
    index = DocumentIndex(settings.index_dir, embedder.dim, source, settings.store_url)
    try:
        if index.needs_reembedding:
            index.reembed(lambda ps: embedder.encode([p.as_text() for p in ps], progress=progress, bf16=bf16))
        documents = hotpot_documents(passages)
        # A few large upserts: each one commits and rewrites the index file once.
        for start in range(0, len(documents), chunk):
            part = documents[start : start + chunk]
            vectors = embedder.encode(
                [Passage(d.title, d.text).as_text() for d in part],
                batch_size=settings.embed_batch_size,
                progress=progress,
                bf16=bf16,
            )
            index.upsert(part, vectors)
        return len(index)
    finally:
        index.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--if-missing", action="store_true", help="do nothing if an index already exists")
    parser.add_argument("--limit", type=int, default=None, help="index only the first N paragraphs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings()
    if args.if_missing and index_exists(settings):
        print("the index already has documents; nothing to do")
        return
    passages = qa_data.corpus()[: args.limit]
    torch.set_grad_enabled(False)
    count = build_index(settings, passages)
    print(f"{count} documents indexed in {settings.index_dir}")


if __name__ == "__main__":
    main()
