"""What the HTTP server is told at start: names, keys, limits, and the vLLM switches of its API.

Boundary: a frozen, validated value; `loramux serve` and a Ray replica build it from flags
(builder.py), the app (api.py) and the generation routes (generate.py) read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loramux.server.reasoning_parsers import PARSERS as REASONING_PARSERS
from loramux.server.tool_parsers import PARSERS


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    """The `model` id of the base model."""
    model_aliases: tuple[str, ...] = ()
    """Other ids of the base model a request may name (vLLM's further --served-model-name names)."""
    api_keys: tuple[str, ...] = ()
    """If any, every /v1 route and /tokenize, /detokenize need `Authorization: Bearer <key>`, any
    one of them."""
    allowed_lora_dirs: tuple[str, ...] = ()
    """Runtime adapter loads must resolve inside one of these; none: runtime loading is off."""
    resolve_adapters: bool = True
    """A request naming an adapter nobody loaded is served from the folder of that name in
    allowed_lora_dirs, loaded on first use (vLLM's filesystem LoRA resolver). Off on a Ray
    replica, whose adapters Ray Serve's multiplexing loads and unloads."""
    log_prompts: bool = False
    """Write prompt text to the log (off: only ids and lengths)."""
    max_request_bytes: int = 8 << 20
    """Larger request bodies are refused with 413 before they are read whole."""
    allowed_origins: tuple[str, ...] = ()
    """CORS (vLLM's --allowed-origins): origins browsers may call from; none: no CORS headers."""
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    prompt_tokens_details: bool = False
    """Usage gives prompt_tokens_details.cached_tokens (vLLM's --enable-prompt-tokens-details)."""
    docs: bool = True
    """Serve /docs and /openapi.json."""
    request_id_headers: bool = False
    """Every answer carries X-Request-Id (vLLM's --enable-request-id-headers)."""
    load_tracking: bool = False
    """GET /load counts the generation and tokenizer requests in flight (vLLM's
    --enable-server-load-tracking)."""
    force_include_usage: bool = False
    """Streams end with a usage chunk even when stream_options does not ask for it."""
    max_log_len: int | None = None
    """With log_prompts: at most this many characters (or token ids) of a prompt are logged."""
    middleware: tuple[str, ...] = ()
    """Import paths of extra ASGI middleware: classes, or functions of (request, call_next)."""
    exclude_tools_when_tool_choice_none: bool = False
    """A chat request with tool_choice "none" renders its prompt without its tools."""
    auto_tool_parser: str | None = None
    """Chat requests with tools and tool_choice "auto" are answered in free text, and this
    parser (tool_parsers.py) finds the tool calls in it (vLLM's --enable-auto-tool-choice
    --tool-call-parser); None: such requests are refused with the alternatives."""
    reasoning_parser: str | None = None
    """Chat answers are split into reasoning (`<think> ... </think>`) and content by this parser
    (reasoning_parsers.py; vLLM's --reasoning-parser); None: the answer's text is the content."""
    root_path: str = ""
    """The path prefix a reverse proxy serves the app under (requests may carry it or not)."""
    max_stored_responses: int = 1000
    """The Responses API keeps this many finished responses (the oldest go first) for GET
    /v1/responses/{id} and previous_response_id; 0 keeps none."""
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """chat_template_kwargs every chat request starts from; its own override them."""

    def __post_init__(self) -> None:
        if not isinstance(self.default_chat_template_kwargs, dict):
            raise ValueError(
                "--default-chat-template-kwargs takes a JSON object, e.g. '{\"enable_thinking\": false}'"
            )
        if self.max_stored_responses < 0:
            raise ValueError(f"--max-stored-responses {self.max_stored_responses}: give 0 or more")
        if self.auto_tool_parser is not None and self.auto_tool_parser not in PARSERS:
            raise ValueError(
                f"--tool-call-parser {self.auto_tool_parser}: loramux has the parsers {sorted(PARSERS)}"
            )
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"--reasoning-parser {self.reasoning_parser}: loramux has the parsers "
                f"{sorted(REASONING_PARSERS)}"
            )
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"--max-log-len {self.max_log_len}: give 0 or more characters")

    @property
    def base_names(self) -> tuple[str, ...]:
        return (self.served_model_name, *self.model_aliases)
