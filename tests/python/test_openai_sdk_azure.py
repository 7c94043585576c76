"""The official OpenAI Python SDK against a running modelgate proxy whose routes go to Azure
OpenAI backends (the mock in tests/src/upstream.rs, in its Azure mode): the classic
deployment URL and the v1 API, Azure's filter chunks in streams, the content-filter 400.

Run by tests/tests/sdk.rs (`openai_python_sdk_works_against_an_azure_backend`), which starts
the upstream and the proxy, sets MODELGATE_BASE_URL and MODELGATE_KEY, and afterwards checks
what the upstream received.
"""
import os

import openai
import pytest

BASE = os.environ["MODELGATE_BASE_URL"]
KEY = os.environ["MODELGATE_KEY"]
HELLO = [{"role": "user", "content": "Say hello"}]


def client():
    return openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=30)


@pytest.mark.parametrize("model", ["azure-gpt", "azure-v1"])
def test_chat_completion_keeps_azures_filter_results(model):
    r = client().chat.completions.create(model=model, messages=HELLO)
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == "tok tok tok"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 10
    assert r.usage.completion_tokens == 3
    # Passed through: the SDK keeps Azure's extra fields.
    dumped = r.model_dump()
    assert dumped["prompt_filter_results"][0]["prompt_index"] == 0
    assert dumped["choices"][0]["content_filter_results"]["hate"]["filtered"] is False


@pytest.mark.parametrize("model", ["azure-gpt", "azure-v1"])
def test_stream_has_no_filter_chunks(model):
    stream = client().chat.completions.create(
        model=model,
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    for c in chunks:
        assert c.id, "Azure's filter chunks (id '') never reach the client"
        assert "prompt_filter_results" not in (c.model_extra or {})
        for choice in c.choices:
            assert choice.delta is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 "
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 10
    assert chunks[-1].usage.completion_tokens == 3


def test_stream_helper_accumulates_the_answer():
    with client().chat.completions.stream(model="azure-gpt", messages=HELLO) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "tok0 tok1 tok2 "
    assert final.choices[0].finish_reason == "stop"


def test_blocked_completion_ends_with_content_filter():
    stream = client().chat.completions.create(
        model="azure-blocked", messages=HELLO, stream=True
    )
    finishes = [c.choices[0].finish_reason for c in stream if c.choices]
    assert [f for f in finishes if f is not None] == ["content_filter"]
    r = client().chat.completions.create(model="azure-blocked", messages=HELLO)
    assert r.choices[0].finish_reason == "content_filter"


def test_content_filter_is_a_bad_request_in_openais_words():
    with pytest.raises(openai.BadRequestError) as e:
        client().chat.completions.create(model="azure-filter", messages=HELLO)
    assert e.value.status_code == 400
    assert e.value.code == "content_filter"
    assert e.value.param == "prompt"
    assert e.value.type == "invalid_request_error"
    assert "innererror" not in e.value.body
    assert e.value.message.startswith("Error code: 400")
    with pytest.raises(openai.BadRequestError) as e:
        list(
            client().chat.completions.create(
                model="azure-filter", messages=HELLO, stream=True
            )
        )
    assert e.value.code == "content_filter"


def test_embeddings():
    r = client().embeddings.create(model="azure-gpt", input=["a", "b"])
    assert len(r.data) == 2
    assert r.usage.prompt_tokens == 10
