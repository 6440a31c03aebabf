"""The canonical cache key of a request: equal for requests that must get equal answers.

It hashes what changes the output — task, model and version, the messages or input and
every sampling parameter — as canonical JSON (sorted keys, no insignificant whitespace,
numbers as JSON numbers so 0 and 0.0 agree), and leaves out what does not: request ids,
the end user, streaming, metadata. Entries are scoped per API key unless shared.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import orjson

from clawdbot.common.json_numbers import whole_numbers

KEY_VERSION: Final = "v1"
# Fields that never change what the model answers.
IGNORED_FIELDS: Final = frozenset(
    {"stream", "stream_options", "user", "metadata", "store", "service_tier", "clawdbot", "model", "request_id"}
)


def cache_key(
    task: str,
    model: str,
    version: str,
    scope: str,
    body: dict[str, Any],
    binary: bytes = b"",
    dialect: str = "",
    native: bytes = b"",
) -> str:
    """`v1:<task>:<sha256>`; the task stays readable for operators looking at Redis.

    The caller's dialect ("" for Chat Completions, "anthropic", "responses") is part of the
    key: an answer stored for one (perhaps the upstream's native answer in it, passed
    through) is never replayed to a caller of another. So is the caller's own body
    (`native`, same fields ignored): what its translation leaves out for an upstream that
    reads the native body (a document block, say) still tells two requests apart."""
    material = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    document_fields: dict[str, Any] = {
        "task": task,
        "model": model,
        "version": version,
        "scope": scope,
        "request": whole_numbers(material),
    }
    if dialect:
        # Only when set: Chat keys stay what they were, so no stored entry is orphaned.
        document_fields["dialect"] = dialect
    if native:
        try:
            original = orjson.loads(native)
        except orjson.JSONDecodeError:
            original = None
        if isinstance(original, dict):
            document_fields["native"] = whole_numbers({k: v for k, v in original.items() if k not in IGNORED_FIELDS})
        else:
            document_fields["native_sha256"] = hashlib.sha256(native).hexdigest()
    document = orjson.dumps(document_fields, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(document)
    if binary:
        digest.update(hashlib.sha256(binary).digest())
    return f"{KEY_VERSION}:{task}:{digest.hexdigest()}"
