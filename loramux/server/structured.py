"""The request fields that constrain the output, as one `StructuredOutputsParams`; tool calls.

Boundary: JSON bodies in, plain params out (and the OpenAI `tool_calls` of a finished answer).
The forms, any one per request: OpenAI's `response_format` (`json_object`, `json_schema`),
vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`,
`disable_any_whitespace`) and its older `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`; for chat, `tool_choice` "required" or a named function, which constrain the
output to the tools' argument schemas as vLLM does. `tools` with "auto" is free text whose calls
a parser finds (tool_parsers.py), when the server was started with one; else it is refused with
the alternatives.
"""

from __future__ import annotations

import json
from typing import Any

from loramux.sampling_params import StructuredOutputsParams
from loramux.server.protocol import APIError
from loramux.server.tool_parsers import call

GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
SO_KEYS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")


def structured_params(body: Any, auto_tools: bool = False) -> StructuredOutputsParams | None:
    """The one constraint a request body asks for (None: free text); APIError 400 otherwise.
    `auto_tools`: tool_choice "auto" is answered in free text (a parser finds the calls)."""
    forms: list[tuple[str, dict[str, Any]]] = []
    rf = body.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            forms.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                raise APIError(
                    400,
                    'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                    param="response_format",
                )
            forms.append(("response_format", {"json": js.get("schema", {})}))
        elif kind != "text":
            raise APIError(
                400,
                f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                param="response_format",
            )
    if body.structured_outputs is not None:
        so = body.structured_outputs
        unknown = sorted(set(so) - set(SO_KEYS))
        if unknown:
            raise APIError(
                400,
                f"structured_outputs has unknown field(s) {unknown}; loramux takes {list(SO_KEYS)}",
                param="structured_outputs",
            )
        given = {k: v for k, v in so.items() if v not in (None, False) and k != "disable_any_whitespace"}
        if given:  # disable_any_whitespace alone modifies the form given elsewhere (response_format)
            forms.append(("structured_outputs", given))
    for field, key in GUIDED.items():
        value = getattr(body, field)
        if value is not None:
            forms.append((field, {key: value}))
    forms += [("tool_choice", {"json": s}) for s in [tool_schema(body, auto_tools)] if s is not None]
    if not forms:
        return None
    if len(forms) > 1:
        raise APIError(
            400,
            f"{', '.join(f for f, _ in forms)} each constrain the output; send only one of them",
            param=forms[1][0],
        )
    field, kwargs = forms[0]
    if body.structured_outputs and body.structured_outputs.get("disable_any_whitespace"):
        kwargs = {**kwargs, "disable_any_whitespace": True}
    if body.guided_whitespace_pattern is not None:
        raise APIError(
            400,
            "guided_whitespace_pattern is not supported; use structured_outputs "
            '{"disable_any_whitespace": true} for JSON without optional whitespace',
            param="guided_whitespace_pattern",
        )
    try:
        return StructuredOutputsParams(**kwargs)
    except (TypeError, ValueError) as e:
        raise APIError(400, f"{field}: {e}", param=field) from e


def tool_schema(body: Any, auto_tools: bool = False) -> dict[str, Any] | None:
    """The JSON schema that `tools` with `tool_choice` put on a chat answer (None: none, as for
    no tools, "none", and "auto" when `auto_tools`)."""
    if "tools" not in type(body).model_fields:
        return None  # completions: tools are refused by name with the other unsupported fields
    tools, choice = body.tools, body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise APIError(
                400, "tool_choice needs tools; send tools or leave tool_choice out", param="tool_choice"
            )
        return None
    funcs = function_schemas(tools)
    if choice is None or choice == "auto":
        if auto_tools:
            return None
        raise APIError(
            400,
            'tool_choice "auto" (the default with tools) needs a parser that finds tool calls in free '
            "text: start the server with --enable-auto-tool-choice --tool-call-parser NAME (hermes, "
            'llama3_json, pythonic, qwen3_coder); or use tool_choice "required" (a call to one of the '
            'tools) or name a function ({"type": "function", "function": {"name": ...}}), whose '
            "arguments are then constrained to its schema",
            param="tool_choice",
        )
    if choice == "none":
        return None
    if choice == "required":
        one = {} if getattr(body, "parallel_tool_calls", True) else {"maxItems": 1}
        return {
            "type": "array",
            "minItems": 1,
            **one,
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
                        "required": ["name", "parameters"],
                    }
                    for name, params in funcs.items()
                ]
            },
        }
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if name not in funcs:
        raise APIError(
            400,
            f"tool_choice names {name!r}, which is not among the tools {sorted(funcs)}; use "
            f'"none", "required" or {{"type": "function", "function": {{"name": <one of them>}}}}',
            param="tool_choice",
        )
    return funcs[name]


def function_schemas(tools: list[Any]) -> dict[str, dict[str, Any]]:
    """{name: argument schema} of OpenAI's tools list."""
    out: dict[str, dict[str, Any]] = {}
    for t in tools:
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise APIError(
                400,
                'each tool is {"type": "function", "function": {"name": ..., "parameters": {...}}}',
                param="tools",
            )
        params = f.get("parameters") or {"type": "object", "properties": {}}
        out[f["name"]] = params
    return out


def tool_calls(body: Any, text: str) -> list[dict[str, Any]] | None:
    """The OpenAI tool calls of a finished constrained answer (None: not a tool answer, or
    text the grammar did not finish, e.g. cut by max_tokens)."""
    choice = getattr(body, "tool_choice", None)
    if not getattr(body, "tools", None) or choice in (None, "none", "auto"):
        return None
    if choice == "required":
        try:
            calls = json.loads(text)
        except (json.JSONDecodeError, RecursionError):  # not whole, or nested past the decoder
            return None
        return [call(c["name"], json.dumps(c["parameters"])) for c in calls]
    return [call(choice["function"]["name"], text)]
