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
import keyword
import math
import re
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


# -- the pythonic form's grammar ---------------------------------------------------------------------------------
class ToolSchemaError(ValueError):
    """A function or its parameters cannot be enforced in the pythonic call form (one sentence, naming where)."""


# vLLM's llama4_pythonic parser finds calls with the regex `[a-zA-Z]+\w*\(` and argument names with `[a-zA-Z]+\w*=`
_NAME = re.compile(r"[A-Za-z]\w*\Z", re.ASCII)
# keywords that only describe a schema: they constrain nothing, so the grammar has nothing to enforce for them
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated"}
_ANNOTATIONS |= {"readOnly", "writeOnly"}
_ENFORCED = {"type", "enum", "const", "anyOf", "properties", "required", "additionalProperties", "items"}
_ENFORCED |= {"minItems", "maxItems", "minLength", "maxLength"}
_INTEGER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")  # enforced for integers only
_ENFORCED |= set(_INTEGER_BOUNDS)
_TYPES = ("string", "integer", "number", "boolean", "null", "array", "object")

# Python literals as vLLM's parser reads them (ast.Constant, ast.List, ast.Dict with constant keys): no unary minus
# (`-1` is a UnaryOp there), strings in double or single quotes with the escapes below, no free whitespace.
_BASE_RULES = r"""
py_char_dq ::= [^"\\\x00-\x1f\x7f] | "\\" ["'\\nrt]
py_char_sq ::= [^'\\\x00-\x1f\x7f] | "\\" ["'\\nrt]
py_string ::= "\"" py_char_dq* "\"" | "'" py_char_sq* "'"
py_integer ::= "0" | [1-9] [0-9]*
py_number ::= py_integer ("." [0-9]+)? ([eE] ("+" | "-")? [0-9]+)?
py_boolean ::= "True" | "False"
py_any ::= py_string | py_number | py_boolean | "None" | py_list | py_dict
py_list ::= "[" (py_any (", " py_any)*)? "]"
py_dict ::= "{" (py_string ": " py_any (", " py_string ": " py_any)*)? "}"
"""


def _ebnf(text: str) -> str:
    """`text` as a string literal of xgrammar's EBNF."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) < 0x20 or char == "\x7f":
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def python_literal(value: Any, where: str) -> str:
    """The Python literal vLLM's parser reads back as `value` (a JSON value)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ToolSchemaError(f"{where} holds {value}, which is not a JSON number")
        if value < 0:
            raise ToolSchemaError(
                f"{where} holds {value}: a negative number is `-x` in Python, which vLLM's pythonic parser does not "
                "read as a literal"
            )
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string (without \u escapes) is a Python string literal
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(v, where) for v in value) + "]"
    if isinstance(value, dict):
        entries = [f"{python_literal(k, where)}: {python_literal(v, where)}" for k, v in value.items()]
        return "{" + ", ".join(entries) + "}"
    raise ToolSchemaError(f"{where} holds {value!r}, which is not a JSON value")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "unknown")


def _literal_forms(value: Any, where: str) -> list[str]:
    """The ways to write `value` a model may choose: a string in double or single quotes, anything else one way."""
    double = python_literal(value, where)
    if not isinstance(value, str):
        return [double]
    escapes = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    inner = "".join(escapes.get(c, f"\\x{ord(c):02x}" if ord(c) < 0x20 else c) for c in value)
    return [double, f"'{inner}'"]


class _PythonicGrammar:
    """Builds the EBNF rules, one per schema node."""

    def __init__(self):
        self.rules: list[str] = []

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name} ::= {body}")
        return name

    def call(self, name: str, parameters: Any, where: str) -> str:
        if not _NAME.match(name) or keyword.iskeyword(name):
            raise ToolSchemaError(
                f"function {name!r} is not a name vLLM's pythonic parser reads (a letter, then letters, digits, _)"
            )
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        arguments = self.members(parameters, where, keyword_form=True)
        return self.rule(f'{_ebnf(name + "(")} {arguments} ")"')

    def members(self, schema: Any, where: str, keyword_form: bool) -> str:
        """The inside of an object: `a=1, b="x"` (a call's arguments) or `"a": 1, "b": "x"` (a dict literal), the
        properties in the schema's order, each required one present, no others."""
        if not isinstance(schema, dict):
            raise ToolSchemaError(f"{where} is not a JSON schema object")
        self.check(schema, where)
        if keyword_form and schema.get("type", "object") != "object":
            raise ToolSchemaError(f"{where} has type {schema['type']!r}; a function's parameters are an object")
        properties = schema.get("properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ToolSchemaError(f"{where}.required is not a list of names")
        if properties is None:
            extra = schema.get("additionalProperties", True)
            if required:
                raise ToolSchemaError(f"{where}.required names {required[0]!r}, which it has no properties for")
            if keyword_form or extra is False:  # a free argument name could be a Python keyword: none are written
                return '""'
            value = "py_any" if extra is True else self.value(extra, f"{where}.additionalProperties")
            return self.rule(f'"" | py_string ": " {value} (", " py_string ": " {value})*')
        if not isinstance(properties, dict):
            raise ToolSchemaError(f"{where}.properties is not an object")
        missing = [r for r in required if r not in properties]
        if missing:
            raise ToolSchemaError(f"{where}.required names {missing[0]!r}, which is not in its properties")
        items = []
        for key, sub in properties.items():
            if keyword_form and (not _NAME.match(key) or keyword.iskeyword(key)):
                raise ToolSchemaError(
                    f"{where}.properties has {key!r}, not an argument name vLLM's pythonic parser reads "
                    "(a letter, then letters, digits, _; no Python keyword)"
                )
            written = key + "=" if keyword_form else python_literal(key, where) + ": "
            items.append((_ebnf(written) + " " + self.value(sub, f"{where}.properties.{key}"), key in required))
        # head_i: properties i.. when none is written yet; tail_i: the same after one (each with a leading ", ")
        head, tail = '""', '""'
        for item, needed in reversed(items):
            head_body = f"{item} {tail}" if needed else f"{item} {tail} | {head}"
            tail_body = f'", " {item} {tail}' if needed else f'", " {item} {tail} | {tail}'
            head, tail = self.rule(head_body), self.rule(tail_body)
        return head

    def check(self, schema: dict, where: str) -> None:
        unknown = sorted(set(schema) - _ENFORCED - _ANNOTATIONS)
        if unknown:
            raise ToolSchemaError(
                f"{where} uses {unknown[0]!r}, which the pythonic call form's grammar does not enforce (it enforces "
                f"{', '.join(sorted(_ENFORCED))}); give the parameters without it, or serve with "
                "--tool-call-parser llama4_json"
            )

    def value(self, schema: Any, where: str) -> str:
        """The rule for a value that `schema` allows."""
        if schema is True or schema == {}:
            return "py_any"
        if not isinstance(schema, dict):
            raise ToolSchemaError(f"{where} is not a JSON schema object")
        self.check(schema, where)
        if "anyOf" in schema:
            options = schema["anyOf"]
            if set(schema) - _ANNOTATIONS - {"anyOf"}:
                raise ToolSchemaError(f"{where} has keywords beside anyOf; put them into each of its options")
            if not isinstance(options, list) or not options:
                raise ToolSchemaError(f"{where}.anyOf is not a non-empty list of schemas")
            return self.rule(" | ".join(self.value(o, f"{where}.anyOf.{i}") for i, o in enumerate(options)))
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise ToolSchemaError(f"{where}.enum is not a non-empty list")
            if "type" in schema:  # both apply: the values of the type
                types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
                values = [
                    v for v in values if _json_type(v) in types or (_json_type(v) == "integer" and "number" in types)
                ]
                if not values:
                    raise ToolSchemaError(f"{where} allows no value: none of its enum is of its type")
            forms = [form for v in values for form in _literal_forms(v, where)]
            return self.rule(" | ".join(_ebnf(form) for form in forms))
        types = schema.get("type")
        if types is None:
            types = ["object"] if "properties" in schema else ["array"] if "items" in schema else list(_TYPES)
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or any(t not in _TYPES for t in types):
            raise ToolSchemaError(f"{where}.type is {schema.get('type')!r}; JSON schema has {', '.join(_TYPES)}")
        return self.rule(" | ".join(self.typed(t, schema, where) for t in types))

    def typed(self, kind: str, schema: dict, where: str) -> str:
        if kind == "string":
            low, high = self.bounds(schema, "minLength", "maxLength", where)
            if (low, high) == (0, -1):
                return "py_string"
            return self.rule(f'"\\"" py_char_dq{{{low}, {high}}} "\\"" | "\'" py_char_sq{{{low}, {high}}} "\'"')
        if kind == "integer":
            return self.integer(schema, where)
        if kind == "number" and any(key in schema for key in _INTEGER_BOUNDS):
            bound = next(key for key in _INTEGER_BOUNDS if key in schema)
            raise ToolSchemaError(
                f"{where} bounds a number with {bound!r}, which the pythonic call form's grammar enforces for "
                "integers only; use type integer, or serve with --tool-call-parser llama4_json"
            )
        if kind in ("number", "boolean"):
            return f"py_{kind}"
        if kind == "null":
            return '"None"'
        if kind == "object":
            return self.rule(f'"{{" {self.members(schema, where, keyword_form=False)} "}}"')
        item = self.value(schema.get("items", True), f"{where}.items")
        low, high = self.bounds(schema, "minItems", "maxItems", where)
        if high == 0:
            return '"[]"'
        more = f'(", " {item}){{{max(low - 1, 0)}, {-1 if high == -1 else high - 1}}}'
        return self.rule(f'"[" {item} {more} "]"' + (' | "[]"' if low == 0 else ""))

    def integer(self, schema: dict, where: str) -> str:
        """Integers in the schema's bounds, written without a sign (vLLM's parser reads no unary minus)."""
        low, high = 0, None
        for key in _INTEGER_BOUNDS:
            if key not in schema:
                continue
            bound = schema[key]
            if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not math.isfinite(bound):
                raise ToolSchemaError(f"{where}.{key} is {bound!r}; give a number")
            if key == "minimum":
                low = max(low, math.ceil(bound))
            elif key == "exclusiveMinimum":
                low = max(low, math.floor(bound) + 1)
            else:
                top = math.floor(bound) if key == "maximum" else math.ceil(bound) - 1
                high = top if high is None else min(high, top)
        if high is not None and high < low:
            raise ToolSchemaError(
                f"{where} allows no integer from 0 up (negative numbers are `-x` in Python, which vLLM's pythonic "
                "parser does not read as a literal)"
                if high < 0
                else f"{where} allows no integer between its bounds"
            )
        if low == 0 and high is None:
            return "py_integer"
        return self.rule(_digits_between(low, high))

    @staticmethod
    def bounds(schema: dict, low_key: str, high_key: str, where: str) -> tuple[int, int]:
        low, high = schema.get(low_key, 0), schema.get(high_key, -1)
        for key, bound in ((low_key, low), (high_key, high)):
            if not isinstance(bound, int) or isinstance(bound, bool) or (bound < 0 and key == low_key):
                raise ToolSchemaError(f"{where}.{key} is {bound!r}; give a non-negative integer")
        if high != -1 and (high < 0 or high < low):
            raise ToolSchemaError(f"{where}.{high_key} is {high}, less than {low_key} {low}")
        return low, high


def _digits_between(low: int, high: int | None) -> str:
    """EBNF for the decimal integers in [low, high] (high None: no upper bound), 0 <= low, no leading zeros."""
    lo = str(low)
    longest = len(str(high)) if high is not None else None
    options = []
    if high is not None and len(str(high)) == len(lo):
        options.append(_same_length(lo, str(high)))
    else:
        options.append(_same_length(lo, "9" * len(lo)))
        if longest is None:
            options.append(f"[1-9] [0-9]{{{len(lo)}, -1}}")  # every longer number
        else:
            if longest - 1 > len(lo):
                options.append(f"[1-9] [0-9]{{{len(lo)}, {longest - 2}}}")  # lengths strictly between
            options.append(_same_length("1" + "0" * (longest - 1), str(high)))
    return " | ".join(f"({option})" for option in options)


def _same_length(low: str, high: str) -> str:
    """EBNF for the digit strings of one length from `low` to `high` (inclusive, compared as numbers)."""
    if len(low) == 1:
        return f"[{low}-{high}]"
    first, last, rest = int(low[0]), int(high[0]), len(low) - 1
    if first == last:
        return f'"{first}" ({_same_length(low[1:], high[1:])})'
    options = [f'"{first}" ({_same_length(low[1:], "9" * rest)})']
    if last - first > 1:
        options.append(f"[{first + 1}-{last - 1}] [0-9]{{{rest}}}")
    options.append(f'"{last}" ({_same_length("0" * rest, high[1:])})')
    return " | ".join(f"({option})" for option in options)


def pythonic_call_grammar(functions: list[dict], where: str = "tools") -> str:
    """xgrammar EBNF that admits exactly one call `[name(arg=value, ...)]` to one of `functions` (OpenAI function
    specs, given with their index in the request's tools as `index`), written as vLLM's llama4_pythonic parser reads
    it: Python literals (strings, non-negative numbers, True/False/None, lists, dicts) whose values the function's
    parameter schema allows, every required argument present, in the schema's order."""
    grammar = _PythonicGrammar()
    calls = [
        grammar.call(f["name"], f.get("parameters"), f"{where}.{f.get('index', i)}.function.parameters")
        for i, f in enumerate(functions)
    ]
    root = f'root ::= "[" ({" | ".join(calls)}) "]"'
    return "\n".join([root, *grammar.rules]) + _BASE_RULES
