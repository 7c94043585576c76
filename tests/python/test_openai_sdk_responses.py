"""The official OpenAI Python SDK's Responses API (`client.responses`) against a running
modelgate proxy, on backends of every kind: the built-in mock (chat, translated), an OpenAI
upstream (pass-through), an Anthropic upstream (translated), and, when the test sets their
models, Bedrock and Gemini upstreams (translated).

Run by tests/tests/sdk.rs (`openai_responses_api_works_on_every_backend`), which starts the
upstreams and the proxy, sets MODELGATE_BASE_URL, MODELGATE_KEY and MODELGATE_RESPONSES_MODELS
(comma-separated `name=kind` pairs), and afterwards checks what the upstreams received and
what the proxy metered.
"""
import json
import os

import openai
import pytest

BASE = os.environ["MODELGATE_BASE_URL"]
KEY = os.environ["MODELGATE_KEY"]
MODELS = dict(
    pair.split("=", 1)
    for pair in os.environ.get(
        "MODELGATE_RESPONSES_MODELS", "mock-gpt=mock,gpt-pass=openai,claude-r=anthropic"
    ).split(",")
)
# Backends the gateway translates to: stored state is refused there.
TRANSLATED = [m for m, kind in MODELS.items() if kind != "openai"]
TOOL_MODELS = [m for m in MODELS if m.endswith("-tool")]
TEXT_MODELS = [m for m in MODELS if not m.endswith("-tool")]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def client():
    return openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=30)


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_create_answers_text_with_usage(model):
    r = client().responses.create(model=model, input="Say hello", max_output_tokens=64)
    assert r.object == "response"
    assert r.status == "completed", r
    # A translated answer names the client's model; a passed-through one is the upstream's
    # own bytes, with the model it ran (an Azure deployment's, say).
    assert r.model == model or MODELS[model] == "openai"
    assert r.output_text, r
    assert r.output[-1].type == "message"
    assert r.usage.input_tokens > 0
    assert r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_stream_sends_the_responses_event_sequence(model):
    events = list(
        client().responses.create(
            model=model,
            instructions="Be brief.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}],
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created", kinds
    assert kinds[-1] == "response.completed", kinds
    assert "response.output_text.delta" in kinds
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), numbers
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text
    assert final.usage.output_tokens > 0


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_stream_helper_accumulates_the_final_response(model):
    with client().responses.stream(model=model, input="Say hello") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(deltas)
    assert final.status == "completed"


@pytest.mark.parametrize("model", TOOL_MODELS)
def test_streamed_function_call_arguments(model):
    events = list(
        client().responses.create(
            model=model, input="Weather in Paris? (tool)", tools=[WEATHER], stream=True
        )
    )
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds, kinds
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert isinstance(json.loads(done[0].arguments), dict)
    final = events[-1].response
    assert [o.type for o in final.output].count("function_call") == 1


@pytest.mark.parametrize("model", TOOL_MODELS)
def test_function_tools_over_two_turns(model):
    c = client()
    # "tool": the knob the cloud mocks answer with a call of the first declared tool.
    first = c.responses.create(
        model=model, input="Weather in Paris? (tool)", tools=[WEATHER], tool_choice="auto"
    )
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls, first
    call = calls[0]
    assert call.name == "get_weather"
    assert isinstance(json.loads(call.arguments), dict)
    # The next turn: the model's output items back, with the function's result.
    second = c.responses.create(
        model=model,
        tools=[WEATHER],
        input=[{"role": "user", "content": "Weather in Paris? (tool)"}]
        + [o.model_dump(exclude_none=True) for o in first.output]
        + [{"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}],
    )
    assert second.status == "completed", second


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_json_schema_output_is_accepted(model):
    r = client().responses.create(
        model=model,
        input="A city as JSON",
        text={
            "format": {
                "type": "json_schema",
                "name": "city",
                "schema": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}},
                    "required": ["name"],
                    "additionalProperties": False,
                },
                "strict": True,
            }
        },
    )
    assert r.status == "completed", r


@pytest.mark.parametrize("model", TRANSLATED)
def test_stored_state_is_refused_where_the_backend_keeps_none(model):
    with pytest.raises(openai.BadRequestError) as e:
        client().responses.create(
            model=model, input="And then?", previous_response_id="resp_abc123"
        )
    assert e.value.status_code == 400
    assert "previous_response_id" in str(e.value)


def test_stored_state_passes_through_to_openai():
    models = [m for m, kind in MODELS.items() if kind == "openai"]
    if not models:
        pytest.skip("no OpenAI backend in this run")
    r = client().responses.create(
        model=models[0], input="And then?", previous_response_id="resp_abc123", store=True
    )
    assert r.status == "completed"
    assert r.previous_response_id == "resp_abc123"


def test_unknown_model_is_a_404_in_openais_shape():
    with pytest.raises(openai.NotFoundError) as e:
        client().responses.create(model="no-such-model", input="hi")
    assert e.value.status_code == 404
    assert e.value.body["type"] == "invalid_request_error"
