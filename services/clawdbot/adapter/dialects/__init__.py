"""The APIs the adapter speaks besides Chat Completions: Anthropic's Messages API
(anthropic_api.py) and OpenAI's Responses API (responses_api.py). Each translates its
requests to the one internal request (a Chat Completions body, plus the native body for an
upstream that speaks the same API) and the answers back (common/dialects/)."""
