"""Tool calls: the two forms Llama 4's published chat templates teach (vLLM's `llama4_json` and
`llama4_pythonic` parsers read the same), templates in their structure, and the schema that enforces a call."""

from __future__ import annotations

import functools
import json
import re

import pytest

pytest.importorskip("jinja2", reason="the serve extra is not installed")

from llama4_deploy.serving.server import ChatTemplate  # noqa: E402
from llama4_deploy.serving.tools import (  # noqa: E402
    ToolCall,
    ToolSchemaError,
    call_schema,
    parse,
    pythonic_call_grammar,
)

NAMES = {"get_weather", "get_time"}


@pytest.mark.parametrize(
    "text, calls",
    [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [ToolCall("get_weather", {"city": "Paris"})]),
        (
            ' {"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {}}\n',
            [ToolCall("get_weather", {"city": "Rome"}), ToolCall("get_time", {})],
        ),
        ('{"name": "get_time", "arguments": {"tz": "UTC"}}', [ToolCall("get_time", {"tz": "UTC"})]),
        ('{"name": "launch", "parameters": {}}', None),  # not one of the request's functions
        ('The weather is {"name": "get_time"}', None),  # prose first: content
        ('{"name": "get_time", "parameters": [1]}', None),
        ("", None),
    ],
)
def test_llama4_json(text, calls):
    assert parse("llama4_json", text, NAMES) == calls


@pytest.mark.parametrize(
    "text, calls",
    [
        ('[get_weather(city="Paris", days=2)]', [ToolCall("get_weather", {"city": "Paris", "days": 2})]),
        (
            "[get_weather(city='Rome'), get_time()]",
            [ToolCall("get_weather", {"city": "Rome"}), ToolCall("get_time", {})],
        ),
        ("[get_time(tz=None, opts={'a': [1, 2.5]})]", [ToolCall("get_time", {"tz": None, "opts": {"a": [1, 2.5]}})]),
        ("[get_weather(city=paris)]", None),  # a variable, not a literal
        ("[os.system(cmd='ls')]", None),
        ('get_weather(city="Paris")', None),  # not a list
        ("[launch()]", None),
        ("It is sunny.", None),
    ],
)
def test_llama4_pythonic(text, calls):
    assert parse("llama4_pythonic", text, NAMES) == calls


def test_openai_form_of_a_call():
    call = ToolCall("get_weather", {"city": "Paris"}).openai()
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


# a template in the structure of Llama 4's JSON tool template (tools in the first user message, an assistant's
# calls as {"name", "parameters"} with tojson, tool results under the ipython header), written here
TEMPLATE = (
    "{{- bos_token }}{%- if tools is not defined %}{%- set tools = none %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' and tools is not none and loop.first %}"
    "{{- '<|header_start|>user<|header_end|>\\n\\n' }}{%- for t in tools %}{{- t | tojson }}\\n{%- endfor %}"
    "{{- message.content + '<|eot|>' }}"
    "{%- elif 'tool_calls' in message %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}"
    "{%- for call in message.tool_calls %}"
    '{{- \'{"name": "\' + call.function.name + \'", "parameters": \' }}'
    "{{- call.function.arguments | tojson }}{{- '}' }}"
    "{%- endfor %}{{- '<|eot|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|header_start|>ipython<|header_end|>\\n\\n' + message.content + '<|eom|>' }}"
    "{%- else %}{{- '<|header_start|>' + message.role + '<|header_end|>\\n\\n' + message.content + '<|eot|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)


def test_tools_calls_and_results_reach_the_template(tmp_path):
    path = tmp_path / "llama4_json.jinja"
    path.write_text(TEMPLATE)
    template = ChatTemplate(None, path)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "What time is it?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}
            ],
        },
        {"role": "tool", "content": "12:00", "tool_call_id": "c1"},
    ]
    text = template.render(messages, {"tools": tools})
    assert json.dumps(tools[0], sort_keys=True) in text  # tojson sorts keys
    assert '<|header_start|>assistant<|header_end|>\n\n{"name": "get_time", "parameters": {"tz": "UTC"}}<|eot|>' in text
    assert text.endswith(
        "<|header_start|>ipython<|header_end|>\n\n12:00<|eom|><|header_start|>assistant<|header_end|>\n\n"
    )


def test_the_call_schema_admits_exactly_the_functions():
    schema = call_schema(
        [{"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}, {"name": "b"}]
    )
    assert [o["properties"]["name"]["const"] for o in schema["anyOf"]] == ["a", "b"]
    assert schema["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}


# a template in the structure of Llama 4's pythonic tool template (the functions as JSON in a system turn with the
# instruction to answer `[func_name(param=value, ...)]`, an assistant's calls written back in that form, tool results
# under the ipython header), written here
PYTHONIC_TEMPLATE = (
    "{{- bos_token }}{%- if tools is not defined %}{%- set tools = none %}{%- endif %}"
    "{%- if tools is not none %}{{- '<|header_start|>system<|header_end|>\\n\\n' }}"
    "{{- 'Here is a list of functions in JSON format that you can invoke:\\n' }}"
    "{%- for t in tools %}{{- t | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- 'To call functions, answer only [func_name1(param1=value1, param2=value2), func_name2(param=value)]' }}"
    "{{- '<|eot|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.tool_calls %}{{- '<|header_start|>assistant<|header_end|>\\n\\n[' }}"
    "{%- for call in message.tool_calls %}{{- call.function.name + '(' }}"
    "{%- for name, value in call.function.arguments.items() %}{{- name + '=' + value | tojson }}"
    "{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}{{- ')' }}"
    "{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}{{- ']<|eot|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|header_start|>ipython<|header_end|>\\n\\n' + message.content + '<|eot|>' }}"
    "{%- else %}{{- '<|header_start|>' + message.role + '<|header_end|>\\n\\n' + message.content + '<|eot|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)


def test_the_pythonic_template_writes_calls_the_parser_reads_back(tmp_path):
    path = tmp_path / "llama4_pythonic.jinja"
    path.write_text(PYTHONIC_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    text = ChatTemplate(None, path).render(messages, {"tools": tools})
    assert text.startswith("<|header_start|>system<|header_end|>\n\nHere is a list of functions")
    written = text.split("<|header_start|>assistant<|header_end|>\n\n")[1].split("<|eot|>")[0]
    assert written == '[get_weather(city="Paris")]'
    assert parse("llama4_pythonic", written, {"get_weather"}) == [ToolCall("get_weather", {"city": "Paris"})]


# a function with every kind of bounded parameter the pythonic grammar enforces (bounded: even a random-weight
# model's call ends within max_tokens), and one whose values are unbounded
FORECAST = {
    "name": "forecast",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"enum": ["paris", "rome"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "note": {"type": "string", "maxLength": 3},
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
            "where": {
                "anyOf": [
                    {"type": "null"},
                    {"type": "object", "properties": {"lat": {"type": "integer", "maximum": 90}}, "required": ["lat"]},
                ]
            },
        },
        "required": ["city"],
        "additionalProperties": False,
    },
}
ANYTHING = {
    "name": "log",
    "parameters": {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "x": {"type": "number"}, "text": {"type": "string"}, "extra": {}},
    },
}
CLOCK = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}


@functools.cache
def _compiled(grammar: str):
    import xgrammar

    info = xgrammar.TokenizerInfo([bytes([b]) for b in range(256)], xgrammar.VocabType.RAW)
    return xgrammar.GrammarCompiler(info).compile_grammar(grammar)


def admits(grammar: str, text: str) -> bool:
    """Whether the EBNF grammar takes `text` whole (xgrammar's own matcher over a vocabulary of single bytes)."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(_compiled(grammar))
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.mark.parametrize(
    "text, valid",
    [
        ('[forecast(city="paris")]', True),
        ("[get_time()]", True),
        ('[forecast(city=\'rome\', days=12, note="a\\"b", flags=[True, False], where={"lat": 45})]', True),
        ('[forecast(city="paris", where=None)]', True),
        ("[log()]", True),
        ('[log(n=123456789012, x=4.5e-1, text=\'a long text\', extra=[{"k": [1, "v", None]}])]', True),
        ("[log(x=-1.5)]", False),  # a negative number is not a literal to vLLM's parser
        ('[forecast(city="paris", note="é世\\n")]', True),  # note holds 3 characters
        ("[forecast(days=1)]", False),  # city is required
        ('[forecast(city="nice")]', False),  # not in the enum
        ('[forecast(city="paris", days=15)]', False),  # maximum 14
        ('[forecast(city="paris", days=0)]', False),  # minimum 1
        ('[forecast(city="paris", days=01)]', False),  # no leading zero (a syntax error in Python)
        ('[forecast(city="paris", days=1.5)]', False),  # not an integer
        ('[forecast(city="paris", note="abcd")]', False),  # maxLength 3
        ('[forecast(city="paris", flags=[True, True, True])]', False),  # maxItems 2
        ('[forecast(days=1, city="paris")]', False),  # the schema's order
        ('[forecast(city="paris", where={})]', False),  # lat is required
        ('[forecast(city="paris", wind=3)]', False),  # no such argument
        ("[get_time(x=1)]", False),
        ('[forecast(city="paris", where={"lat": 91})]', False),  # maximum 90
        ('[forecast(city="paris"), get_time()]', False),  # one call
        ('forecast(city="paris")', False),  # not a list
        ("[forecast(city=paris)]", False),  # a name, not a literal
        ('[forecast(city="paris",days=1)]', False),  # one separator form: no free whitespace
    ],
)
def test_the_pythonic_grammar_admits_exactly_valid_calls(text, valid):
    pytest.importorskip("xgrammar")
    grammar = pythonic_call_grammar([FORECAST, CLOCK, ANYTHING])
    assert admits(grammar, text) == valid
    if valid:  # what it admits, the parser reads (as vLLM's would)
        assert parse("llama4_pythonic", text, {"forecast", "get_time", "log"}) is not None


def test_integer_bounds_admit_exactly_the_integers_between_them():
    pytest.importorskip("xgrammar")
    for bounds, allowed in [
        ({"minimum": 7, "maximum": 123}, range(7, 124)),
        ({"exclusiveMinimum": 95, "exclusiveMaximum": 1005}, range(96, 1005)),
        ({"minimum": 120}, range(120, 10**4)),
    ]:
        function = {"name": "f", "parameters": {"properties": {"k": {"type": "integer", **bounds}}, "required": ["k"]}}
        grammar = pythonic_call_grammar([function])
        wrong = [k for k in range(0, 1500) if admits(grammar, f"[f(k={k})]") != (k in allowed)]
        assert wrong == [], (bounds, wrong[:5])


def test_a_named_function_admits_only_its_own_calls():
    pytest.importorskip("xgrammar")
    grammar = pythonic_call_grammar([CLOCK])
    assert admits(grammar, "[get_time()]") and not admits(grammar, '[forecast(city="paris")]')


@pytest.mark.parametrize(
    "function, words",
    [
        ({"name": "get-time"}, "'get-time' is not a name vLLM's pythonic parser reads"),
        ({"name": "f", "parameters": {"type": "object", "properties": {"class": {}}}}, "'class', not an argument name"),
        (
            {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}},
            "tools.0.function.parameters.properties.x uses 'pattern', which the pythonic call form's grammar does not",
        ),
        ({"name": "f", "parameters": {"type": "object", "properties": {"x": {"enum": [1, -2]}}}}, "holds -2"),
        (
            {"name": "f", "parameters": {"type": "object", "properties": {}, "required": ["y"]}},
            "names 'y', which is not",
        ),
        ({"name": "f", "parameters": {"type": "array"}}, "a function's parameters are an object"),
        ({"name": "f", "parameters": {"properties": {"x": {"type": "string", "enum": [1, 2]}}}}, "none of its enum"),
        ({"name": "f", "parameters": {"properties": {"x": {"type": "number", "minimum": 0.5}}}}, "for integers only"),
        ({"name": "f", "parameters": {"properties": {"x": {"type": "integer", "maximum": -1}}}}, "no integer from 0"),
    ],
)
def test_schemas_the_pythonic_grammar_cannot_enforce_are_refused(function, words):
    with pytest.raises(ToolSchemaError, match=re.escape(words)):
        pythonic_call_grammar([function])
