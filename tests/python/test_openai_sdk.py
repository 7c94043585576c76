"""The official OpenAI Python SDK against a running modelgate proxy.

Run by tests/tests/sdk.rs, which starts the proxy and sets MODELGATE_BASE_URL and the keys.
"""
import os

import openai
import pytest

BASE = os.environ["MODELGATE_BASE_URL"]
KEY = os.environ["MODELGATE_KEY"]
LIMITED_KEY = os.environ["MODELGATE_LIMITED_KEY"]
NARROW_KEY = os.environ["MODELGATE_NARROW_KEY"]


def client(key=KEY):
    return openai.OpenAI(base_url=BASE, api_key=key, max_retries=0, timeout=30)


def test_chat_completion():
    r = client().chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.startswith("Hello from the modelgate mock model")
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_streaming_chat_completion():
    stream = client().chat.completions.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from the modelgate mock model")
    assert all(c.usage is None for c in chunks), "no usage chunk unless asked for"


def test_streaming_with_usage():
    stream = client().chat.completions.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_models_list():
    ids = sorted(m.id for m in client().models.list())
    assert ids == ["gpt-4o-mini", "mock-gpt"]
    assert [m.id for m in client(NARROW_KEY).models.list()] == ["gpt-4o-mini"]


def test_embeddings_in_base64_and_float():
    r = client().embeddings.create(model="mock-gpt", input=["a", "b"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 8
    f = client().embeddings.create(model="mock-gpt", input="a", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-6)


def test_unknown_key_raises_authentication_error():
    with pytest.raises(openai.AuthenticationError) as e:
        client("sk-not-a-key").chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"


def test_rate_limit_raises_rate_limit_error():
    c = client(LIMITED_KEY)
    c.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 429
    assert e.value.code == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_other_errors_are_typed():
    with pytest.raises(openai.NotFoundError):
        client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.PermissionDeniedError):
        client(NARROW_KEY).chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError):
        client().chat.completions.create(model="mock-gpt", messages="not a list")
