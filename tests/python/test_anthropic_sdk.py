"""The official Anthropic Python SDK against a running modelgate proxy's /v1/messages.

Run by tests/tests/sdk.rs (`anthropic_python_sdk_works_against_the_proxy`), which starts a
mock upstream and the proxy with these models:

- `mock-gpt`: the built-in mock provider (it speaks OpenAI's API: translated both ways);
- `gpt-up`: an OpenAI-compatible upstream (translated both ways);
- `claude-pass`, `claude-tools`, `claude-turns`, `claude-bad`, `claude-busy`: an upstream speaking
  Anthropic's Messages API (passed through), the last two failing with 400 and 529.
"""
import os

import anthropic
import pytest

BASE = os.environ["MODELGATE_BASE_URL"]
KEY = os.environ["MODELGATE_KEY"]
LIMITED_KEY = os.environ["MODELGATE_LIMITED_KEY"]
HELLO = [{"role": "user", "content": "Say hello"}]
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def client(key=KEY):
    return anthropic.Anthropic(base_url=BASE, api_key=key, max_retries=0, timeout=30)


@pytest.mark.parametrize("model", ["mock-gpt", "gpt-up", "claude-pass"])
def test_create(model):
    m = client().messages.create(model=model, max_tokens=64, messages=HELLO)
    assert m.type == "message"
    assert m.role == "assistant"
    assert m.model == model if model != "claude-pass" else m.model == "claude-upstream"
    assert m.content[-1].type == "text" and m.content[-1].text
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0
    assert m.usage.output_tokens > 0


@pytest.mark.parametrize("model", ["mock-gpt", "gpt-up", "claude-pass"])
def test_stream(model):
    with client().messages.stream(model=model, max_tokens=64, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    assert final.content[-1].text == text
    assert final.stop_reason == "end_turn"
    # Usage reaches the SDK whatever the backend: Anthropic's in message_start and
    # message_delta, an OpenAI backend's in the message_delta the gateway writes.
    assert final.usage.input_tokens > 0
    assert final.usage.output_tokens > 0


def test_cache_tokens_reach_the_client():
    m = client().messages.create(model="claude-pass", max_tokens=64, messages=HELLO)
    assert m.usage.cache_read_input_tokens == 3
    assert m.usage.input_tokens == 10
    with client().messages.stream(model="claude-pass", max_tokens=64, messages=HELLO) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens == 3
    assert final.usage.input_tokens == 10


def test_tools_over_two_turns_keep_the_thinking_block():
    c = client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = c.messages.create(model="claude-turns", max_tokens=2048, messages=messages, tools=[WEATHER])
    assert first.stop_reason == "tool_use"
    kinds = [b.type for b in first.content]
    assert kinds == ["thinking", "text", "tool_use"]
    assert first.content[0].signature
    call = first.content[-1]
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    messages += [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18°C"}]},
    ]
    second = c.messages.create(model="claude-turns", max_tokens=2048, messages=messages, tools=[WEATHER])
    assert second.stop_reason == "tool_use"


def test_streamed_tool_use():
    with client().messages.stream(
        model="claude-tools", max_tokens=2048, messages=HELLO, tools=[WEATHER]
    ) as stream:
        final = stream.get_final_message()
    assert final.content[-1].type == "tool_use"
    assert final.content[-1].input == {"city": "Paris"}
    assert final.content[0].type == "thinking" and final.content[0].signature


def test_count_tokens():
    exact = client().messages.count_tokens(model="claude-pass", messages=HELLO)
    assert exact.input_tokens == 10, "from the Anthropic backend"
    raw = client().messages.with_raw_response.count_tokens(model="mock-gpt", messages=HELLO)
    assert raw.headers.get("x-modelgate-token-count") == "estimated"
    assert raw.parse().input_tokens > 0


def test_models_list():
    ids = sorted(m.id for m in client().models.list())
    assert "mock-gpt" in ids and "claude-pass" in ids


def test_errors():
    with pytest.raises(anthropic.AuthenticationError) as e:
        client("sk-wrong").messages.create(model="mock-gpt", max_tokens=8, messages=HELLO)
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        client().messages.create(model="no-such-model", max_tokens=8, messages=HELLO)
    with pytest.raises(anthropic.BadRequestError):
        client().messages.create(model="claude-bad", max_tokens=8, messages=HELLO)
    with pytest.raises(anthropic.OverloadedError):
        client().messages.create(model="claude-busy", max_tokens=8, messages=HELLO)
    client(LIMITED_KEY).messages.create(model="mock-gpt", max_tokens=8, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as e:
        client(LIMITED_KEY).messages.create(model="mock-gpt", max_tokens=8, messages=HELLO)
    assert e.value.response.headers.get("retry-after")
