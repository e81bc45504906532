"""Tool calls: the two forms Llama 4's published chat templates teach (vLLM's `llama4_json` and
`llama4_pythonic` parsers read the same), templates in their structure, and the schema that enforces a call."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("jinja2", reason="the serve extra is not installed")

from llama4_deploy.serving.server import ChatTemplate  # noqa: E402
from llama4_deploy.serving.tools import ToolCall, call_schema, parse  # noqa: E402

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
