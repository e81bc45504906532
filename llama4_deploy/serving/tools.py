"""Tool calls: reading them out of a reply, in the two forms Llama 4's published chat templates teach the model
(the names are vLLM's parsers'), and the grammar that makes `tool_choice` "required" or a named function hold.

- `llama4_json`: `{"name": "get_weather", "parameters": {"city": "Paris"}}`, several separated by `;`;
- `llama4_pythonic`: `[get_weather(city="Paris"), get_time()]`, Python call syntax with literal arguments.

A reply that is not wholly tool calls to known functions is content, as vLLM's parsers decide.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import uuid
from typing import Any

PARSERS = ("llama4_json", "llama4_pythonic")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def openai(self, index: int | None = None) -> dict:
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }
        return call if index is None else {"index": index, **call}


def parse(parser: str, text: str, names: set[str]) -> list[ToolCall] | None:
    """The tool calls `text` consists of, or None when it is not (only) calls to functions in `names`."""
    calls = _json_calls(text) if parser == "llama4_json" else _pythonic_calls(text)
    if not calls or any(call.name not in names for call in calls):
        return None
    return calls


def _json_calls(text: str) -> list[ToolCall] | None:
    decoder, calls, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        arguments = value.get("parameters", value.get("arguments", {}))
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(value["name"], arguments))
        while at < len(text) and text[at] in " \t\n;":
            at += 1
    return calls


def _pythonic_calls(text: str) -> list[ToolCall] | None:
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List):
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        except ValueError:
            return None
        if len(arguments) != len(node.keywords):
            return None
        calls.append(ToolCall(node.func.id, arguments))
    return calls


def call_schema(tools: list[dict]) -> dict:
    """A JSON schema that only a `llama4_json` call to one of `tools` (OpenAI function specs) satisfies."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["name"]},
                "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}
