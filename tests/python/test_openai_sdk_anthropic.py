"""The official OpenAI Python SDK against a running modelgate proxy whose routes go to an
upstream speaking Anthropic's Messages API (the mock in tests/src/upstream.rs).

Run by tests/tests/sdk.rs (`openai_python_sdk_works_against_an_anthropic_backend`), which
starts the upstream and the proxy, sets MODELGATE_BASE_URL and MODELGATE_KEY, and afterwards
checks what the upstream received.
"""
import json
import os

import openai
import pytest

BASE = os.environ["MODELGATE_BASE_URL"]
KEY = os.environ["MODELGATE_KEY"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def client():
    return openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=30)


def test_chat_completion_with_cache_tokens():
    r = client().chat.completions.create(
        model="claude-text", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert r.object == "chat.completion"
    assert r.model == "claude-text"
    assert r.choices[0].message.content == "tok0 tok1 tok2 "
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 10 + 3
    assert r.usage.prompt_tokens_details.cached_tokens == 3
    assert r.usage.completion_tokens == 3
    assert r.usage.total_tokens == 16


def test_stream_with_usage():
    stream = client().chat.completions.create(
        model="claude-text",
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 "
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 13
    assert chunks[-1].usage.completion_tokens == 3


def test_stream_helper_accumulates_the_answer():
    with client().chat.completions.stream(
        model="claude-text", messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "tok0 tok1 tok2 "
    assert final.choices[0].finish_reason == "stop"


def test_tools_over_two_turns_keep_the_thinking_block():
    c = client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = c.chat.completions.create(model="claude-turns", messages=messages, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.id == "toolu_mock1"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # Thinking rides along as extra fields the SDK keeps on the message.
    assert choice.message.reasoning_content == "Let me think."
    blocks = choice.message.thinking_blocks
    assert blocks[0]["type"] == "thinking" and blocks[0]["signature"]
    # The app passes the message object back, as the SDK's docs show.
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "18°C, sunny"}]
    second = c.chat.completions.create(model="claude-turns", messages=messages, tools=[WEATHER])
    assert second.choices[0].message.tool_calls[0].id == "toolu_mock1"


def test_streamed_tool_call_arguments_arrive_whole():
    stream = client().chat.completions.create(
        model="claude-sdk",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        stream=True,
    )
    args, names, finish = "", [], None
    for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                assert tc.index == 0
                if tc.function.name:
                    names.append(tc.function.name)
                args += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    assert names == ["get_weather"]
    assert json.loads(args) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_what_anthropic_cannot_do_is_a_bad_request():
    with pytest.raises(openai.BadRequestError) as e:
        client().chat.completions.create(
            model="claude-text", messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client().chat.completions.create(
            model="claude-text", messages=[{"role": "user", "content": "hi"}], logprobs=True
        )
    assert e.value.body["param"] == "logprobs"


def test_upstream_errors_are_openai_errors():
    with pytest.raises(openai.BadRequestError) as e:
        client().chat.completions.create(
            model="claude-bad", messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.body["message"] == "mock upstream failure"
    with pytest.raises(openai.InternalServerError):
        client().chat.completions.create(
            model="claude-busy", messages=[{"role": "user", "content": "hi"}]
        )
