#!/bin/sh
# Container entrypoint: make sure GRERANK_INDEX_DIR holds an index, then exec the command, so the server is
# PID 1 and receives SIGTERM itself (no shell in between to swallow or delay it).
#
#   GRERANK_BUILD_INDEX=if-missing (default)  when GRERANK_INDEX_DIR has no index, copy one from
#       GRERANK_INDEX_SEED (a published index, e.g. a read-only volume) or from the demo index baked into
#       the image; build it from the shipped HotpotQA paragraphs only if neither exists.
#   GRERANK_BUILD_INDEX=never                 start with whatever is there (an empty index if nothing).
#   With GRERANK_STORE_URL (a shared PostgreSQL store) there is no index to copy: if-missing fills an empty
#   store with the demo paragraphs once, and every replica's FAISS index follows the store.
set -eu

# An empty GRERANK_ARTIFACT means unset: the service's default (the shipped trained reranker).
if [ -z "${GRERANK_ARTIFACT:-}" ]; then
    unset GRERANK_ARTIFACT
fi

has_index() {
    [ -f "$1/vectors.faiss" ] && [ -f "$1/documents.sqlite3" ]
}

if [ -n "${GRERANK_STORE_URL:-}" ]; then
    if [ "${GRERANK_BUILD_INDEX:-if-missing}" = "if-missing" ]; then
        python -m service.storage.build_index --if-missing
    fi
elif [ "${GRERANK_BUILD_INDEX:-if-missing}" = "if-missing" ]; then
    dest="${GRERANK_INDEX_DIR:?GRERANK_INDEX_DIR is not set}"
    if ! has_index "$dest"; then
        for src in ${GRERANK_INDEX_SEED:-} /opt/grerank/demo-index; do
            if has_index "$src"; then
                mkdir -p "$dest"
                cp -R "$src/." "$dest/"
                echo "grerank-entrypoint: copied the index from $src to $dest"
                break
            fi
        done
    fi
    if ! has_index "$dest"; then
        python -m service.storage.build_index --if-missing
    fi
fi

exec "$@"
