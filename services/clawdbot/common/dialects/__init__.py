"""Translators between the APIs callers and upstreams speak and the one internal request
(a Chat Completions body): anthropic.py for Anthropic's Messages API, responses.py for
OpenAI's Responses API. Each dialect has one decoder and one encoder per direction, so N
dialects need 2N translators, not N²."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson

from clawdbot.common.dialects import anthropic


def _anthropic_replay(message: Any) -> list[bytes]:
    return [orjson.dumps(event) for event in anthropic.message_events(message)]


# A cached native answer (ModelResponse.dialect) as the stream payloads of its dialect,
# for a streaming caller served from the cache.
NATIVE_REPLAY: Final[Mapping[str, Callable[[Any], list[bytes]]]] = {anthropic.DIALECT: _anthropic_replay}
