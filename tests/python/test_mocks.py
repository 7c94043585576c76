"""Self-tests of the Bedrock and Google mocks (mock_bedrock.py, mock_google.py): each mock runs
as a subprocess, as the gateway's integration tests run it, and is driven by the official
client libraries (botocore's signer, client and event-stream parser; google-auth's signer
and service-account flow), so the wire formats and the checks are proven against them.

    .venv/bin/python -m pytest tests/python/test_mocks.py -q
"""

import base64
import datetime as dt
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from unittest import mock

import botocore.auth
import botocore.session
import pytest
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import crypt
from google.auth import jwt as gjwt

HERE = os.path.dirname(os.path.abspath(__file__))
ACCESS, SECRET = "AKIAMOCKTEST0000000", "mock/secret+key"
REGION = "eu-west-1"
MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
ROLE = "arn:aws:iam::123456789012:role/modelgate"
API_KEY = "AIzaMockGeminiKey"
PROJECT = "proj-test"
CLOUD = "https://www.googleapis.com/auth/cloud-platform"


class Mock:
    def __init__(self, script, *args):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, script), "--exit-on-stdin-eof", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("listening 127.0.0.1:"), line
        self.url = "http://" + line.split()[1]

    def stop(self):
        self.proc.stdin.close()  # --exit-on-stdin-eof: the mock exits by itself
        assert self.proc.wait(5) == 0

    def get(self, path):
        return json.load(urllib.request.urlopen(self.url + path))

    def reset(self):
        urllib.request.urlopen(urllib.request.Request(self.url + "/_mock/reset", data=b"", method="POST"))


def http(method, url, body=b"", headers=None):
    """(status, headers, body bytes) of one request, errors included."""
    req = urllib.request.Request(url, data=body if method != "GET" else None, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


# ================================================================ Bedrock


@pytest.fixture(scope="module")
def bedrock(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("wit") / "token"
    token_file.write_text("web-identity-1\n")
    m = Mock("mock_bedrock.py", "--access-key", ACCESS, "--secret-key", SECRET, "--region", REGION,
             "--web-identity-token", f"@{token_file}", "--role-arn", ROLE,
             "--pod-identity-token", "pod-identity-1")
    m.token_file = token_file
    yield m
    m.stop()


def client(url, key=ACCESS, secret=SECRET, token=None):
    return botocore.session.get_session().create_client(
        "bedrock-runtime", region_name=REGION, endpoint_url=url, aws_access_key_id=key,
        aws_secret_access_key=secret, aws_session_token=token,
        config=Config(retries={"max_attempts": 1}))


def signed(url, path, body: dict, key=ACCESS, secret=SECRET, token=None, region=REGION):
    """An AWSRequest signed by botocore's SigV4Auth, as the gateway will send it."""
    req = AWSRequest(method="POST", url=url + path, data=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(key, secret, token), "bedrock", region).add_auth(req)
    return req


def send(req: AWSRequest, body=None):
    return http("POST", req.url, req.body if body is None else body, dict(req.headers.items()))


def user(text):
    return {"role": "user", "content": [{"text": text}]}


TOOLS = {"tools": [{"toolSpec": {"name": "get_weather", "description": "Weather of a city",
                                 "inputSchema": {"json": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                                                          "required": ["city", "days"]}}}}]}
PATH = "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"


def test_converse_signed_by_botocore_answers_per_the_service_model(bedrock):
    bedrock.reset()
    r = client(bedrock.url).converse(modelId=MODEL, messages=[user("hello there cache")],
                                     system=[{"text": "be brief"}], inferenceConfig={"maxTokens": 50})
    assert r["output"]["message"] == {"role": "assistant", "content": [{"text": "mock answer to: hello there cache"}]}
    assert r["stopReason"] == "end_turn"
    u = r["usage"]
    assert u["cacheReadInputTokens"] == 64 and u["cacheWriteInputTokens"] == 32
    assert u["totalTokens"] == u["inputTokens"] + u["outputTokens"] + 64 + 32
    assert r["metrics"]["latencyMs"] >= 1
    [rec] = bedrock.get("/_mock/requests")
    assert rec["path"] == PATH  # the model id percent-encoded, as sent
    assert rec["auth"]["ok"] and rec["auth"]["access_key"] == ACCESS and rec["auth"]["checked_at"] > 0
    assert rec["headers"]["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS}/")


def test_tampered_body_wrong_secret_unknown_key_and_old_date_are_refused_as_aws_does(bedrock):
    body = {"messages": [user("hi")]}
    ok = signed(bedrock.url, PATH, body)
    status, _, _ = send(ok)
    assert status == 200
    status, h, out = send(ok, json.dumps({"messages": [user("hi!")]}).encode())
    assert status == 403 and h["x-amzn-ErrorType"].split(":")[0] == "InvalidSignatureException"
    assert json.loads(out)["message"].startswith("The request signature we calculated does not match")
    status, h, _ = send(signed(bedrock.url, PATH, body, secret="wrong"))
    assert status == 403 and h["x-amzn-ErrorType"].startswith("InvalidSignatureException:")
    status, h, out = send(signed(bedrock.url, PATH, body, key="AKIAUNKNOWN000000000"))
    assert status == 403 and h["x-amzn-ErrorType"].startswith("UnrecognizedClientException:")
    assert json.loads(out) == {"message": "The security token included in the request is invalid."}
    status, h, _ = send(signed(bedrock.url, PATH, body, region="us-west-2"))
    assert status == 403 and h["x-amzn-ErrorType"].startswith("InvalidSignatureException:")
    old = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(minutes=10)
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=old):
        stale = signed(bedrock.url, PATH, body)
    status, h, out = send(stale)
    assert status == 403 and h["x-amzn-ErrorType"].startswith("InvalidSignatureException:")
    assert json.loads(out)["message"].startswith("Signature expired: ") and "- 5 min.)" in json.loads(out)["message"]
    status, h, _ = http("POST", bedrock.url + PATH, json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert status == 403 and h["x-amzn-ErrorType"].startswith("MissingAuthenticationTokenException:")
    assert bedrock.get("/_mock/stats")["signature_failures"] >= 3


def frames(raw: bytes):
    buf = EventStreamBuffer()
    buf.add_data(raw)  # botocore's parser checks both CRCs and the lengths
    return [(m.headers, json.loads(m.payload)) for m in buf]


def test_converse_stream_frames_parse_with_botocores_event_stream_parser(bedrock):
    body = {"messages": [user("weather please tool thinking")], "toolConfig": TOOLS}
    status, h, raw = send(signed(bedrock.url, PATH.replace("/converse", "/converse-stream"), body))
    assert status == 200 and h["Content-Type"] == "application/vnd.amazon.eventstream"
    evs = frames(raw)
    assert all(hd[":message-type"] == "event" and hd[":content-type"] == "application/json" for hd, _ in evs)
    kinds = [hd[":event-type"] for hd, _ in evs]
    assert kinds[0] == "messageStart" and kinds[-2:] == ["messageStop", "metadata"]
    assert "contentBlockStart" in kinds and kinds.count("contentBlockStop") == 3
    deltas = [p["delta"] for hd, p in evs if hd[":event-type"] == "contentBlockDelta"]
    texts = [d["text"] for d in deltas if "text" in d]
    assert len(texts) >= 3 and "".join(texts) == "mock answer to: weather please tool thinking"
    reasoning = [d["reasoningContent"] for d in deltas if "reasoningContent" in d]
    assert any("signature" in r for r in reasoning) and any("text" in r for r in reasoning)
    tool_input = "".join(d["toolUse"]["input"] for d in deltas if "toolUse" in d)
    assert len([d for d in deltas if "toolUse" in d]) >= 2
    assert json.loads(tool_input) == {"city": "mock", "days": 1}
    start = next(p for hd, p in evs if hd[":event-type"] == "contentBlockStart")
    assert start["start"]["toolUse"]["name"] == "get_weather"
    assert evs[-2][1]["stopReason"] == "tool_use"
    assert set(evs[-1][1]["usage"]) >= {"inputTokens", "outputTokens", "totalTokens"}


def test_stream_error_is_an_exception_frame(bedrock):
    status, _, raw = send(signed(bedrock.url, PATH.replace("/converse", "/converse-stream"), {"messages": [user("go stream_error")]}))
    assert status == 200
    evs = frames(raw)
    hd, payload = evs[-1]
    assert hd[":message-type"] == "exception" and hd[":exception-type"] == "throttlingException"
    assert payload == {"message": "Too many requests, please wait before trying again."}
    # botocore's client surfaces it as the modelled error
    r = client(bedrock.url).converse_stream(modelId=MODEL, messages=[user("again stream_error")])
    with pytest.raises(Exception, match="throttlingException"):
        list(r["stream"])


def test_reasoning_signature_must_come_back_unchanged(bedrock):
    c = client(bedrock.url)
    first = c.converse(modelId=MODEL, messages=[user("think thinking")])
    msg = first["output"]["message"]
    assert "signature" in msg["content"][0]["reasoningContent"]["reasoningText"]
    history = [user("think thinking"), msg, user("and now?")]
    assert c.converse(modelId=MODEL, messages=history)["stopReason"] == "end_turn"
    msg["content"][0]["reasoningContent"]["reasoningText"]["signature"] = "forged"
    with pytest.raises(c.exceptions.ValidationException, match="Invalid `signature`"):
        c.converse(modelId=MODEL, messages=history)


def test_validation_errors_and_error_knobs(bedrock):
    c = client(bedrock.url)
    with pytest.raises(c.exceptions.ValidationException, match="must start with a user message"):
        c.converse(modelId=MODEL, messages=[{"role": "assistant", "content": [{"text": "x"}]}])
    with pytest.raises(c.exceptions.ValidationException, match="alternate"):
        c.converse(modelId=MODEL, messages=[user("a"), user("b")])
    tool_use = {"role": "assistant", "content": [{"toolUse": {"toolUseId": "tu_1", "name": "get_weather", "input": {}}}]}
    bad_result = {"role": "user", "content": [{"toolResult": {"toolUseId": "tu_2", "content": [{"text": "sunny"}]}}]}
    with pytest.raises(c.exceptions.ValidationException, match="Expected toolResult blocks at messages.2.content for the following Ids: tu_1"):
        c.converse(modelId=MODEL, messages=[user("w tool"), tool_use, bad_result], toolConfig=TOOLS)
    good = {"role": "user", "content": [{"toolResult": {"toolUseId": "tu_1", "content": [{"json": {"sky": "sunny"}}]}}]}
    r = c.converse(modelId=MODEL, messages=[user("w tool"), tool_use, good], toolConfig=TOOLS)
    assert r["stopReason"] == "end_turn"  # knobs ride in the last user text: none after tool results
    status, _, out = send(signed(bedrock.url, PATH, {"messages": [user("x")], "inferenceConfig": {"maxTokens": 0}}))
    assert status == 400 and "inferenceConfig.maxTokens" in json.loads(out)["message"]
    with pytest.raises(c.exceptions.ThrottlingException) as e:
        c.converse(modelId=MODEL, messages=[user("x code=ThrottlingException")])
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    with pytest.raises(c.exceptions.ServiceUnavailableException):
        c.converse(modelId=MODEL, messages=[user("x code=ServiceUnavailableException")])
    r = c.converse(modelId=MODEL, messages=[user("x guardrail")])
    assert r["stopReason"] == "guardrail_intervened"
    r = c.converse(modelId=MODEL, messages=[user("x tool")], toolConfig=TOOLS)
    assert r["stopReason"] == "tool_use" and r["output"]["message"]["content"][-1]["toolUse"]["input"] == {"city": "mock", "days": 1}


def sts_client(url):
    return botocore.session.get_session().create_client(
        "sts", region_name=REGION, endpoint_url=url, config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}))


def test_sts_web_identity_credentials_then_a_signed_call(bedrock):
    sts = sts_client(bedrock.url)
    r = sts.assume_role_with_web_identity(RoleArn=ROLE, RoleSessionName="gw", WebIdentityToken="web-identity-1")
    cr = r["Credentials"]
    assert cr["AccessKeyId"].startswith("ASIA") and r["AssumedRoleUser"]["Arn"].endswith(":assumed-role/modelgate/gw")
    left = (cr["Expiration"] - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert 3500 < left <= 3600
    out = client(bedrock.url, cr["AccessKeyId"], cr["SecretAccessKey"], cr["SessionToken"]).converse(modelId=MODEL, messages=[user("temp")])
    assert out["output"]["message"]["content"][0]["text"] == "mock answer to: temp"
    status, h, _ = send(signed(bedrock.url, PATH, {"messages": [user("x")]}, cr["AccessKeyId"], cr["SecretAccessKey"]))
    assert status == 403 and h["x-amzn-ErrorType"].startswith("UnrecognizedClientException:")
    with pytest.raises(sts.exceptions.InvalidIdentityTokenException):
        sts.assume_role_with_web_identity(RoleArn=ROLE, RoleSessionName="gw", WebIdentityToken="web-identity-2")
    bedrock.token_file.write_text("web-identity-2")  # rotated: re-read on every call
    sts.assume_role_with_web_identity(RoleArn=ROLE, RoleSessionName="gw", WebIdentityToken="web-identity-2")
    with pytest.raises(sts.exceptions.ClientError, match="AccessDenied"):
        sts.assume_role_with_web_identity(RoleArn=ROLE + "x", RoleSessionName="gw", WebIdentityToken="web-identity-2")
    assert bedrock.get("/_mock/stats")["sts_credentials_issued"] == 2


def test_pod_identity_credentials_as_botocores_container_provider_reads_them(bedrock, tmp_path):
    from botocore.credentials import ContainerProvider
    from botocore.utils import ContainerMetadataFetcher
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text("pod-identity-1")
    env = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": bedrock.url + "/v1/credentials",
           "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file)}
    provider = ContainerProvider(environ=env, fetcher=ContainerMetadataFetcher())
    creds = provider.load().get_frozen_credentials()
    assert creds.access_key.startswith("ASIA") and creds.token
    out = client(bedrock.url, creds.access_key, creds.secret_key, creds.token).converse(modelId=MODEL, messages=[user("pod")])
    assert out["output"]["message"]["content"][0]["text"] == "mock answer to: pod"
    token_file.write_text("someone-else")
    with pytest.raises(Exception, match="403"):
        ContainerProvider(environ=env, fetcher=ContainerMetadataFetcher()).load()
    status, _, body = http("GET", bedrock.url + "/v1/credentials")
    assert status == 400 and json.loads(body)["message"]
    assert bedrock.get("/_mock/stats")["container_rejected"] >= 2


def test_temporary_credentials_expire():
    m = Mock("mock_bedrock.py", "--access-key", ACCESS, "--secret-key", SECRET, "--region", REGION,
             "--web-identity-token", "tok-1234", "--sts-ttl", "4")
    try:
        # Loaded before the credentials are issued: on a busy machine loading botocore's
        # models alone can take longer than the credentials' short life.
        sts = sts_client(m.url)
        client(m.url)
        cr = sts.assume_role_with_web_identity(RoleArn=ROLE, RoleSessionName="gw", WebIdentityToken="tok-1234")["Credentials"]
        deadline = time.time() + 4.0
        c = client(m.url, cr["AccessKeyId"], cr["SecretAccessKey"], cr["SessionToken"])
        c.converse(modelId=MODEL, messages=[user("before")])
        time.sleep(max(0.0, deadline - time.time()) + 0.05)
        with pytest.raises(c.exceptions.ClientError, match="ExpiredTokenException") as e:
            c.converse(modelId=MODEL, messages=[user("after")])
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert e.value.response["Error"]["Message"] == "The security token included in the request is expired"
    finally:
        m.stop()


# ================================================================ Google


@pytest.fixture(scope="module")
def google(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("sa") / "sa.json"
    m = Mock("mock_google.py", "--write-service-account", str(key_file), "--project", PROJECT, "--api-key", API_KEY)
    m.key_file = str(key_file)
    m.sa = json.load(open(key_file))
    yield m
    m.stop()


def assertion(sa, signer=None, **claims):
    now = int(time.time())
    payload = {"iss": sa["client_email"], "scope": CLOUD, "aud": sa["token_uri"], "iat": now, "exp": now + 3600, **claims}
    signer = signer or crypt.RSASigner.from_service_account_info(sa)
    return gjwt.encode(signer, payload).decode()


def post_form(url, form: dict):
    body = "&".join(f"{k}={urllib.parse.quote(v, safe='')}" for k, v in form.items()).encode()
    status, _, out = http("POST", url, body, {"Content-Type": "application/x-www-form-urlencoded"})
    return status, json.loads(out)


def token(google, **claims):
    return post_form(google.url + "/token", {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                             "assertion": assertion(google.sa, **claims)})


def post_json(url, body, headers=None):
    status, h, out = http("POST", url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})
    return status, h, out


def vertex_url(google, model="gemini-2.5-flash", action="generateContent", publisher="google", project=PROJECT):
    return f"{google.url}/v1/projects/{project}/locations/us-central1/publishers/{publisher}/models/{model}:{action}"


def test_service_account_key_file_and_jwt_bearer_grant(google):
    sa = google.sa
    assert sa["type"] == "service_account" and sa["project_id"] == PROJECT
    assert sa["token_uri"] == google.url + "/token" and sa["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    status, tok = token(google)
    assert status == 200 and tok["token_type"] == "Bearer" and tok["access_token"].startswith("ya29.")
    assert 3000 < tok["expires_in"] <= 3600
    status, _, out = post_json(vertex_url(google), {"contents": [{"role": "user", "parts": [{"text": "hi vertex"}]}]},
                               {"Authorization": f"Bearer {tok['access_token']}"})
    assert status == 200, out
    r = json.loads(out)
    assert r["candidates"][0]["content"] == {"role": "model", "parts": [{"text": "mock answer to: hi vertex"}]}
    assert r["candidates"][0]["finishReason"] == "STOP" and r["modelVersion"] == "gemini-2.5-flash" and r["responseId"]
    u = r["usageMetadata"]
    assert u["totalTokenCount"] == u["promptTokenCount"] + u["candidatesTokenCount"]


def test_google_auths_own_service_account_flow_gets_a_token(google):
    import urllib3
    from google.auth.transport.urllib3 import Request
    from google.oauth2 import service_account
    creds = service_account.Credentials.from_service_account_file(google.key_file, scopes=[CLOUD])
    creds.refresh(Request(urllib3.PoolManager()))
    assert creds.token.startswith("ya29.") and creds.valid


def test_bad_assertions_are_refused_with_googles_wording(google):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    forged = crypt.RSASigner.from_string(pem, key_id=google.sa["private_key_id"])
    status, out = post_form(google.url + "/token", {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                                    "assertion": assertion(google.sa, signer=forged)})
    assert (status, out) == (400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
    now = int(time.time())
    status, out = token(google, iat=now, exp=now + 7200)
    assert status == 400 and out["error"] == "invalid_grant" and "short-lived" in out["error_description"]
    status, out = token(google, aud="https://example.com/token")
    assert status == 400 and out["error"] == "invalid_grant"
    status, out = token(google, scope="https://www.googleapis.com/auth/userinfo.email")
    assert status == 400 and out["error"] == "invalid_scope"
    status, out = token(google, iss="someone@else.iam.gserviceaccount.com")
    assert status == 400 and out["error"] == "invalid_grant"
    status, out = post_form(google.url + "/token", {"grant_type": "client_credentials", "assertion": "x"})
    assert status == 400 and out["error"] == "unsupported_grant_type"


def test_metadata_server_token_needs_the_flavor_header(google):
    path = "/computeMetadata/v1/instance/service-accounts/default/token"
    status, _, _ = http("GET", google.url + path)
    assert status == 403
    status, h, out = http("GET", google.url + path, headers={"Metadata-Flavor": "Google"})
    assert status == 200 and h["Metadata-Flavor"] == "Google"
    tok = json.loads(out)
    assert tok["token_type"] == "Bearer"
    status, _, _ = post_json(vertex_url(google), {"contents": [{"role": "user", "parts": [{"text": "x"}]}]},
                             {"Authorization": f"Bearer {tok['access_token']}"})
    assert status == 200
    status, _, out = post_json(vertex_url(google), {"contents": [{"role": "user", "parts": [{"text": "x"}]}]},
                               {"Authorization": "Bearer ya29.not-issued"})
    assert status == 401 and json.loads(out)["error"]["status"] == "UNAUTHENTICATED"
    status, _, out = post_json(vertex_url(google, project="other"), {"contents": [{"role": "user", "parts": [{"text": "x"}]}]},
                               {"Authorization": f"Bearer {tok['access_token']}"})
    assert status == 403 and json.loads(out)["error"]["status"] == "PERMISSION_DENIED"


def gemini_url(google, model="gemini-3-pro-preview", action="generateContent"):
    return f"{google.url}/v1beta/models/{model}:{action}"


def test_gemini_api_key_check(google):
    body = {"contents": [{"parts": [{"text": "hello"}]}]}
    status, _, out = post_json(gemini_url(google), body)
    assert status == 403 and json.loads(out)["error"]["status"] == "PERMISSION_DENIED"
    status, _, out = post_json(gemini_url(google), body, {"x-goog-api-key": "wrong"})
    assert status == 400 and json.loads(out)["error"]["message"] == "API key not valid. Please pass a valid API key."
    assert json.loads(out)["error"]["status"] == "INVALID_ARGUMENT"
    status, _, _ = post_json(gemini_url(google), body, {"x-goog-api-key": API_KEY})
    assert status == 200
    status, _, _ = post_json(gemini_url(google) + f"?key={API_KEY}", body)
    assert status == 200


FN_TOOLS = [{"functionDeclarations": [{"name": "get_weather", "description": "Weather",
                                       "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}}]}]


def test_thought_signature_must_come_back(google):
    key = {"x-goog-api-key": API_KEY}
    first_turn = [{"role": "user", "parts": [{"text": "weather? tool"}]}]
    status, _, out = post_json(gemini_url(google), {"contents": first_turn, "tools": FN_TOOLS}, key)
    assert status == 200
    part = json.loads(out)["candidates"][0]["content"]["parts"][0]
    assert part["functionCall"] == {"name": "get_weather", "args": {"city": "mock"}}
    sig = part["thoughtSignature"]
    assert base64.b64decode(sig)
    response = {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"sky": "sunny"}}}]}
    history = first_turn + [{"role": "model", "parts": [part]}, response]
    status, _, out = post_json(gemini_url(google), {"contents": history, "tools": FN_TOOLS}, key)
    assert status == 200, out
    assert json.loads(out)["candidates"][0]["content"]["parts"][0]["text"].startswith("mock answer to: weather?")
    unsigned = first_turn + [{"role": "model", "parts": [{"functionCall": part["functionCall"]}]}, response]
    status, _, out = post_json(gemini_url(google), {"contents": unsigned, "tools": FN_TOOLS}, key)
    err = json.loads(out)["error"]
    assert status == 400 and err["status"] == "INVALID_ARGUMENT"
    assert err["message"].startswith("Function call is missing a thought_signature in functionCall parts.")
    wrong = [dict(response, parts=[{"functionResponse": {"name": "other", "response": {}}}])]
    status, _, _ = post_json(gemini_url(google), {"contents": first_turn + [{"role": "model", "parts": [part]}] + wrong}, key)
    assert status == 400
    status, _, _ = post_json(gemini_url(google), {"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, key)
    assert status == 400
    assert google.get("/_mock/stats")["thought_signatures_verified"] >= 1


def test_gemini_stream_is_sse_with_crlf_and_knobs(google):
    key = {"x-goog-api-key": API_KEY}
    body = {"contents": [{"role": "user", "parts": [{"text": "stream me please thinking cache"}]}],
            "generationConfig": {"thinkingConfig": {"includeThoughts": True}}}
    status, h, out = post_json(gemini_url(google, action="streamGenerateContent") + "?alt=sse", body, key)
    assert status == 200 and h["Content-Type"] == "text/event-stream"
    events = out.decode().split("\r\n\r\n")
    assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    parts = [p for c in chunks for p in c["candidates"][0]["content"]["parts"]]
    assert parts[0]["thought"] is True
    assert "".join(p["text"] for p in parts if not p.get("thought")) == "mock answer to: stream me please thinking cache"
    assert len(chunks) >= 4 and chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    u = chunks[-1]["usageMetadata"]
    assert u["thoughtsTokenCount"] == 20 and u["cachedContentTokenCount"] == 64
    assert u["totalTokenCount"] == u["promptTokenCount"] + u["candidatesTokenCount"] + u["thoughtsTokenCount"]
    r = json.loads(post_json(gemini_url(google), {"contents": [{"parts": [{"text": "x blocked"}]}]}, key)[2])
    assert r["promptFeedback"]["blockReason"] == "SAFETY" and "candidates" not in r
    r = json.loads(post_json(gemini_url(google), {"contents": [{"parts": [{"text": "x safety"}]}]}, key)[2])
    assert r["candidates"][0]["finishReason"] == "SAFETY" and r["candidates"][0]["safetyRatings"]
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}, "required": ["name", "n"]}
    r = json.loads(post_json(gemini_url(google), {"contents": [{"parts": [{"text": "x json"}]}],
                                                  "generationConfig": {"responseMimeType": "application/json", "responseJsonSchema": schema}}, key)[2])
    assert json.loads(r["candidates"][0]["content"]["parts"][0]["text"]) == {"name": "mock", "n": 1}
    status, _, out = post_json(gemini_url(google), {"contents": [{"parts": [{"text": "x code=429"}]}]}, key)
    assert status == 429 and json.loads(out)["error"]["status"] == "RESOURCE_EXHAUSTED"
    status, _, out = post_json(gemini_url(google), {"contents": [{"parts": [{"text": "x code=503"}]}]}, key)
    assert status == 503 and json.loads(out)["error"]["status"] == "UNAVAILABLE"


def test_vertex_thought_signature_message(google):
    status, tok = token(google)
    auth = {"Authorization": f"Bearer {tok['access_token']}"}
    contents = [{"role": "user", "parts": [{"text": "w"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {}}}]}]
    status, _, out = post_json(vertex_url(google, "gemini-3-pro-preview"), {"contents": contents, "tools": FN_TOOLS}, auth)
    assert status == 400 and "is missing a `thought_signature`" in json.loads(out)["error"]["message"]
    contents[1]["parts"][0]["thoughtSignature"] = "skip_thought_signature_validator"
    status, _, _ = post_json(vertex_url(google, "gemini-3-pro-preview"), {"contents": contents, "tools": FN_TOOLS}, auth)
    assert status == 200


def test_vertex_anthropic_raw_predict(google):
    status, tok = token(google)
    auth = {"Authorization": f"Bearer {tok['access_token']}"}
    url = vertex_url(google, "claude-sonnet-4@20250514", "rawPredict", "anthropic")
    body = {"max_tokens": 100, "messages": [{"role": "user", "content": "hello claude thinking"}]}
    status, _, out = post_json(url, body, auth)
    assert status == 400 and json.loads(out)["error"] == {"type": "invalid_request_error", "message": "anthropic_version: Field required"}
    body["anthropic_version"] = "vertex-2023-10-16"
    status, _, out = post_json(url, dict(body, model="claude"), auth)
    assert status == 400
    status, _, out = post_json(url, body, auth)
    assert status == 200, out
    msg = json.loads(out)
    assert msg["type"] == "message" and msg["content"][0]["type"] == "thinking"
    assert msg["content"][1] == {"type": "text", "text": "mock answer to: hello claude thinking"}
    assert msg["stop_reason"] == "end_turn" and msg["usage"]["input_tokens"] >= 1
    again = dict(body, messages=body["messages"] + [{"role": "assistant", "content": msg["content"]}, {"role": "user", "content": "more"}])
    assert post_json(url, again, auth)[0] == 200
    again["messages"][1]["content"][0]["signature"] = "forged"
    assert post_json(url, again, auth)[0] == 400
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    status, h, out = post_json(url.replace(":rawPredict", ":streamRawPredict"),
                               dict(body, stream=True, tools=tools, messages=[{"role": "user", "content": "s tool"}]), auth)
    assert status == 200 and h["Content-Type"] == "text/event-stream"
    events = [(b.split("\n")[0][7:], json.loads(b.split("\n")[1][6:])) for b in out.decode().strip().split("\n\n")]
    names = [e for e, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert all(d["type"] == e for e, d in events)
    partial = "".join(d["delta"]["partial_json"] for e, d in events if e == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == {"city": "mock"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    tool_id = next(d["content_block"]["id"] for e, d in events if e == "content_block_start" and d["content_block"]["type"] == "tool_use")
    bad = dict(body, messages=[{"role": "user", "content": "s"}, {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "get_weather", "input": {}}]},
                               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_other", "content": "x"}]}])
    status, _, out = post_json(url, bad, auth)
    assert status == 400 and "unexpected `tool_use_id`" in json.loads(out)["error"]["message"]
    status, _, out = post_json(url, dict(body, messages=[{"role": "user", "content": "x code=429"}]), auth)
    assert status == 429 and json.loads(out)["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_vertex_tokens_expire():
    m = Mock("mock_google.py", "--token-ttl", "1")
    try:
        path = "/computeMetadata/v1/instance/service-accounts/default/token"
        deadline = time.time() + 1.0
        tok = json.loads(http("GET", m.url + path, headers={"Metadata-Flavor": "Google"})[2])
        url = f"{m.url}/v1/projects/mock-project/locations/us-central1/publishers/google/models/g:generateContent"
        body = {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}
        assert post_json(url, body, {"Authorization": f"Bearer {tok['access_token']}"})[0] == 200
        time.sleep(max(0.0, deadline - time.time()) + 0.05)
        status, _, out = post_json(url, body, {"Authorization": f"Bearer {tok['access_token']}"})
        assert status == 401 and json.loads(out)["error"]["details"][0]["reason"] == "ACCESS_TOKEN_EXPIRED"
    finally:
        m.stop()


def test_malformed_bodies_answer_400_never_a_mock_crash(bedrock, google):
    for body in ([], None, {"messages": "x"}, {"messages": [1]}, {"messages": [{"role": "user", "content": [1]}]},
                 {"messages": [{"role": "user", "content": [{"text": 5}]}]}, {"messages": [user("a")], "system": "x"},
                 {"messages": [user("tool")], "toolConfig": {"tools": "x"}}):
        status, h, _ = send(signed(bedrock.url, PATH, body))
        assert status == 400 and h["x-amzn-ErrorType"].startswith("ValidationException:"), body
    key = {"x-goog-api-key": API_KEY}
    for body in ({"contents": "x"}, {"contents": [1]}, {"contents": [{"parts": [1]}]}, {"contents": [{"parts": [{"text": 3}]}]},
                 {"contents": [{"parts": [{"text": "tool"}]}], "tools": "x"}, {"contents": [{"parts": [{"functionCall": 3}]}]}):
        status, _, out = post_json(gemini_url(google), body, key)
        assert status == 400 and json.loads(out)["error"]["status"] == "INVALID_ARGUMENT", body
    assert "mock_internal_errors" not in bedrock.get("/_mock/stats")
    assert "mock_internal_errors" not in google.get("/_mock/stats")
