"""The official OpenAI Python SDK reading streams the proxy made from whole JSON answers.

Run by tests/tests/answers.rs, which starts the proxy (route `whole`: an upstream that answers
stream requests with plain JSON) and sets MODELGATE_BASE_URL and MODELGATE_KEY.
"""
import os

import openai

BASE = os.environ["MODELGATE_BASE_URL"]
KEY = os.environ["MODELGATE_KEY"]


def client():
    return openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=30)


def test_chat_stream_from_a_json_answer():
    chunks = list(
        client().chat.completions.create(
            model="whole", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok tok tok tok tok"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_chat_stream_with_usage_from_a_json_answer():
    chunks = list(
        client().chat.completions.create(
            model="whole",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 7
    assert chunks[-1].usage.completion_tokens == 5


def test_completion_stream_from_a_json_answer():
    chunks = list(client().completions.create(model="whole", prompt="Once", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "tok tok tok tok tok"
    assert chunks[-1].choices[0].finish_reason == "stop"
