"""A mock of AWS Bedrock Runtime (Converse, ConverseStream), of STS
(AssumeRoleWithWebIdentity) and of the EKS Pod Identity Agent's container credentials
endpoint, speaking the real wire formats and checking what the real services check, for the
gateway's integration tests.

Wire formats: botocore's service models (`bedrock-runtime/2023-09-30/service-2.json`,
`sts/2011-06-15/service-2.json`, shipped with the pinned botocore), AWS's Converse and
AssumeRoleWithWebIdentity API references and the SigV4 and event-stream specifications.

    python mock_bedrock.py --access-key AKIA... --secret-key ... [--region us-east-1]
        [--web-identity-token TOKEN | --web-identity-token @path] [--role-arn ARN]
        [--pod-identity-token TOKEN | --pod-identity-token @path]
        [--sts-ttl SECONDS] [--port N] [--exit-on-stdin-eof]

Prints exactly one line `listening 127.0.0.1:<port>` on stdout, then serves until killed.

Endpoints
- `POST /model/{modelId}/converse`, `POST /model/{modelId}/converse-stream` (modelId
  percent-encoded in the path as SDKs send it, `anthropic.claude-3-5-sonnet-20240620-v1%3A0`).
  Every request's SigV4 signature (service `bedrock`, `--region`) is recomputed with
  botocore's `SigV4Auth` over the method, the path and query as sent, the headers the
  `Authorization` header names and the body received, with the secret of the access key id
  it names: the static pair, or temporary credentials this mock's STS issued (which also need
  their `x-amz-security-token`). Failures answer as AWS does (403, `x-amzn-ErrorType`, JSON
  `{"message"}`): no Authorization → MissingAuthenticationTokenException; unknown key id or
  wrong/missing session token → UnrecognizedClientException; expired temporary credentials →
  ExpiredTokenException; wrong signature, payload hash, scope, or `x-amz-date` more than 5
  minutes off → InvalidSignatureException (AWS's texts). `UNSIGNED-PAYLOAD` is refused.
- `POST /` (form, unsigned as STS accepts): `Action=AssumeRoleWithWebIdentity` with
  `RoleArn`, `RoleSessionName`, `WebIdentityToken`; the token must equal
  `--web-identity-token` (with `@path`, the file is re-read on every call so tests can rotate
  it), the role must equal `--role-arn` when given → `AssumeRoleWithWebIdentityResponse` XML
  (AccessKeyId `ASIA…`, Expiration now + `--sts-ttl`); else 400 `ErrorResponse`
  `InvalidIdentityToken` / `AccessDenied`.
  `DurationSeconds`, when sent, must be 900..43200 (the lifetime is `--sts-ttl` all the same).
- `GET /v1/credentials` (the EKS Pod Identity Agent's path; AWS's SDKs reach it through
  `AWS_CONTAINER_CREDENTIALS_FULL_URI` and send the text of
  `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` as `Authorization`): the header must equal
  `--pod-identity-token` (`@path` re-read on every call) → JSON `{AccessKeyId, SecretAccessKey,
  Token, AccountId, Expiration}` (temporary credentials as STS issues them, same lifetime);
  missing or wrong token → 400 / 403 with a JSON `{"message"}`. The shape is the one
  botocore's `ContainerProvider` reads (tests/python/test_mocks.py drives it with that).
- `GET /_mock/requests`: JSON list of recorded requests `{time, method, path, query,
  headers (lower-case names), body, auth: {checked_at, ok, error?, access_key?}}` (auth on
  Converse requests only); `GET /_mock/stats`: counters (`signature_ok`, `signature_failures`
  (every InvalidSignatureException), `auth_failures` (the other auth errors) and
  `auth_<ErrorType>` each, `sts_credentials_issued`, `sts_rejected`,
  `container_credentials_issued`, `container_rejected`, `temp_credentials_live`,
  `converse`, `converse_stream`, `reasoning_signatures_verified`,
  `reasoning_signature_failures`, `stream_errors_sent`, `streams_cancelled`, `errors`,
  `mock_internal_errors`); `POST /_mock/reset`: clears both (issued credentials and
  signatures stay valid).

Knobs, words in the text of the last user message (its text blocks):

| knob | meaning |
|---|---|
| `tool` | answer a toolUse of the first tool of the request's toolConfig (stopReason tool_use; streamed input in pieces) |
| `thinking` | a reasoningContent block (text + signature) comes first; signatures are remembered and, on later turns, an assistant reasoningContent must carry one this mock issued, unchanged (else 400 ValidationException) |
| `cache` | usage carries cacheReadInputTokens 64 and cacheWriteInputTokens 32 |
| `code=TYPE` | answer the error TYPE (ThrottlingException, ServiceUnavailableException, ModelTimeoutException, AccessDeniedException, ...) with its status from the service model |
| `stream_error` | ConverseStream: a `throttlingException` exception frame after the first text delta, then the stream ends |
| `guardrail` | stopReason guardrail_intervened with the guardrail's canned text |
| `slow` | 200 ms before the answer and between stream frames |

Answers say `mock answer to: <last user text>`; inputTokens ≈ len(all text of the request)/4,
outputTokens ≈ len(answer)/4. Validation as Bedrock does for the basics (400
ValidationException, Bedrock's wording): messages present, starting with user, alternating;
toolResult ids must answer the previous assistant turn's toolUse ids; toolConfig needed when
tool blocks are present; inferenceConfig.maxTokens ≥ 1.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import string
import struct
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

from botocore.loaders import Loader
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

SERVICE = "bedrock"
MAX_SKEW = 300  # seconds: AWS's 5 minutes
SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"
CACHE_READ, CACHE_WRITE = 64, 32

# Error messages as AWS words them.
MSG_INVALID_TOKEN = "The security token included in the request is invalid."
MSG_EXPIRED_TOKEN = "The security token included in the request is expired"
MSG_BAD_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation "
    "for details."
)
ERROR_MESSAGES = {
    "ThrottlingException": "Too many requests, please wait before trying again.",
    "ServiceUnavailableException": "Bedrock is unable to process your request.",
    "ModelTimeoutException": "Model has timed out in processing the request. Try your request again.",
    "InternalServerException": "The server encountered an internal error while processing the request.",
    "AccessDeniedException": "You don't have access to the model with the specified model ID.",
    "ResourceNotFoundException": "The provided model identifier is invalid.",
    "ValidationException": "The provided request is not valid",
    "ModelNotReadyException": "Model is not ready for inference. Wait and try your request again.",
    "ModelErrorException": "The system encountered an unexpected error during processing. Try your request again.",
    "ServiceQuotaExceededException": "Your request exceeds the service quota for your account.",
    "ModelStreamErrorException": "The model stream encountered an error.",
}
CORAL_BEDROCK = "http://internal.amazon.com/coral/com.amazon.bedrock/"
CORAL_SERVICE = "http://internal.amazon.com/coral/com.amazon.coral.service/"
CONTENT_BLOCK_MEMBERS = {
    "text", "image", "document", "video", "audio", "toolUse", "toolResult", "guardContent",
    "cachePoint", "reasoningContent", "citationsContent", "searchResult",
}
GUARDRAIL_TEXT = "Sorry, the model cannot answer this question."


def _error_statuses() -> dict:
    """Each Bedrock Runtime error's HTTP status, from botocore's own service model."""
    model = Loader().load_service_model("bedrock-runtime", "service-2")
    return {
        name: shape["error"]["httpStatusCode"]
        for name, shape in model["shapes"].items()
        if shape.get("exception") and "error" in shape
    }


ERROR_STATUS = _error_statuses()


# ---------------------------------------------------------------- event stream framing


def _header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return struct.pack("B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v


def frame(headers: list, payload: bytes) -> bytes:
    """One `application/vnd.amazon.eventstream` message: prelude (total length, headers
    length, CRC32 of those 8 bytes), string headers (type 7), payload, CRC32 of all before."""
    hdr = b"".join(_header(k, v) for k, v in headers)
    total = 12 + len(hdr) + len(payload) + 4
    prelude = struct.pack(">II", total, len(hdr))
    prelude += struct.pack(">I", zlib.crc32(prelude) & 0xFFFFFFFF)
    body = prelude + hdr + payload
    return body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def event_frame(event_type: str, payload: dict) -> bytes:
    # Bedrock pads every event with a "p" member of letters (hides the payload's length).
    payload = dict(payload, p="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123"[: 8 + len(event_type)])
    return frame(
        [(":event-type", event_type), (":content-type", "application/json"), (":message-type", "event")],
        json.dumps(payload, separators=(",", ":")).encode(),
    )


def exception_frame(exception_type: str, message: str) -> bytes:
    return frame(
        [(":exception-type", exception_type), (":content-type", "application/json"), (":message-type", "exception")],
        json.dumps({"message": message}).encode(),
    )


# ---------------------------------------------------------------- state


class AwsError(Exception):
    def __init__(self, status: int, error_type: str, message: str, namespace: str = CORAL_BEDROCK):
        super().__init__(message)
        self.status, self.error_type, self.message, self.namespace = status, error_type, message, namespace


def validation(message: str) -> AwsError:
    return AwsError(400, "ValidationException", message)


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.requests: list = []
        self.stats: dict = {}
        self.temp_creds: dict = {}  # access key id -> (secret, session token, expiry epoch)
        self.signatures: set = set()  # reasoning signatures issued

    def bump(self, name: str, by: int = 1):
        with self.lock:
            self.stats[name] = self.stats.get(name, 0) + by

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.stats.clear()


def _rand(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


# ---------------------------------------------------------------- SigV4


class _Verifier(SigV4Auth):
    """botocore's SigV4 with the signed-header set taken from the request's Authorization
    header (instead of botocore's own choice), so the signature is recomputed over exactly
    what the client signed."""

    def __init__(self, credentials, region, signed):
        super().__init__(credentials, SERVICE, region)
        self._signed = signed

    def headers_to_sign(self, request):
        out = HTTPHeaders()
        for name in self._signed:
            for v in request.headers.get_all(name) or []:
                out[name] = v
        return out


AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-f]+)\s*$"
)


def verify_sigv4(state: State, method: str, raw_path: str, headers, body: bytes, now: float) -> str:
    """Checks the request's SigV4 signature as AWS does; returns the access key id or
    raises AwsError."""
    auth = headers.get("authorization")
    if not auth:
        raise AwsError(403, "MissingAuthenticationTokenException", "Missing Authentication Token", CORAL_SERVICE)
    m = AUTH_RE.match(auth)
    if not m:
        raise AwsError(403, "IncompleteSignatureException",
                       f"Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' parameters. Authorization={auth.split(' ')[0]}",
                       CORAL_SERVICE)
    credential, signed_headers, signature = m.groups()
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise AwsError(403, "IncompleteSignatureException",
                       f"Credential must have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/term, got '{credential}'",
                       CORAL_SERVICE)
    key_id, date, region, service, _ = parts
    token = headers.get("x-amz-security-token")
    a = state.args
    if key_id == a.access_key:
        secret = a.secret_key
        if token is not None:
            raise AwsError(403, "UnrecognizedClientException", MSG_INVALID_TOKEN, CORAL_SERVICE)
    elif key_id in state.temp_creds:
        secret, session_token, expiry = state.temp_creds[key_id]
        if token != session_token:
            raise AwsError(403, "UnrecognizedClientException", MSG_INVALID_TOKEN, CORAL_SERVICE)
        if now >= expiry:
            raise AwsError(403, "ExpiredTokenException", MSG_EXPIRED_TOKEN, CORAL_SERVICE)
    else:
        raise AwsError(403, "UnrecognizedClientException", MSG_INVALID_TOKEN, CORAL_SERVICE)
    amz_date = headers.get("x-amz-date") or ""
    try:
        signed_at = dt.datetime.strptime(amz_date, SIGV4_TIMESTAMP).replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        raise AwsError(403, "IncompleteSignatureException",
                       "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
                       CORAL_SERVICE) from None
    fmt = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime(SIGV4_TIMESTAMP)  # noqa: E731
    if signed_at < now - MAX_SKEW:
        raise AwsError(403, "InvalidSignatureException",
                       f"Signature expired: {amz_date} is now earlier than {fmt(now - MAX_SKEW)} ({fmt(now)} - 5 min.)",
                       CORAL_SERVICE)
    if signed_at > now + MAX_SKEW:
        raise AwsError(403, "InvalidSignatureException",
                       f"Signature not yet current: {amz_date} is still later than {fmt(now + MAX_SKEW)} ({fmt(now)} + 5 min.)",
                       CORAL_SERVICE)
    if date != amz_date[:8]:
        raise AwsError(403, "InvalidSignatureException",
                       f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{date}' != '{amz_date[:8]}', from '{amz_date}'.",
                       CORAL_SERVICE)
    if service != SERVICE:
        raise AwsError(403, "InvalidSignatureException",
                       f"Credential should be scoped to correct service: '{SERVICE}'. ", CORAL_SERVICE)
    if region != a.region:
        raise AwsError(403, "InvalidSignatureException",
                       f"Credential should be scoped to a valid region, not '{region}'. ", CORAL_SERVICE)
    signed = signed_headers.split(";")
    if "host" not in signed:
        raise AwsError(403, "InvalidSignatureException",
                       "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.", CORAL_SERVICE)
    content_sha = headers.get("x-amz-content-sha256")
    if content_sha is not None and content_sha != hashlib.sha256(body).hexdigest():
        raise AwsError(403, "InvalidSignatureException",
                       "The provided 'x-amz-content-sha256' header does not match what was computed.", CORAL_SERVICE)
    req_headers = HTTPHeaders()
    for name in signed:
        for v in headers.get_all(name) or []:
            req_headers[name] = v
    req = AWSRequest(method=method, url=f"http://{headers.get('host', '')}{raw_path}", headers=req_headers, data=body)
    req.context["timestamp"] = amz_date
    verifier = _Verifier(Credentials(key_id, secret, token), a.region, signed)
    canonical = verifier.canonical_request(req)
    to_sign = verifier.string_to_sign(req, canonical)
    expected = verifier.signature(to_sign, req)
    if not secrets.compare_digest(expected, signature):
        raise AwsError(403, "InvalidSignatureException",
                       f"{MSG_BAD_SIGNATURE}\n\nThe Canonical String for this request should have been\n'{canonical}'\n\n"
                       f"The String-to-Sign should have been\n'{to_sign}'\n", CORAL_SERVICE)
    state.bump("signature_ok")
    return key_id


# ---------------------------------------------------------------- STS


STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"


def sts_error(code: str, message: str, status: int = 400) -> tuple:
    body = (
        f'<ErrorResponse xmlns="{STS_NS}">\n  <Error>\n    <Type>Sender</Type>\n    <Code>{code}</Code>\n'
        f"    <Message>{escape(message)}</Message>\n  </Error>\n  <RequestId>{uuid.uuid4()}</RequestId>\n</ErrorResponse>\n"
    )
    return status, body


def issue_temporary(state: State, now: float) -> tuple:
    """New temporary credentials (key id, secret, session token, expiry), valid for signing."""
    key_id = "ASIA" + _rand(string.ascii_uppercase + "234567", 16)
    secret = _rand(string.ascii_letters + string.digits + "+/", 40)
    token = "IQoJb3JpZ2luX2VjE" + base64.b64encode(os.urandom(180)).decode()
    expiry = now + state.args.sts_ttl
    with state.lock:
        state.temp_creds[key_id] = (secret, token, expiry)
    return key_id, secret, token, expiry


def expected_token(arg):
    """A token argument: the text itself, or `@path` read now (tests rotate the file)."""
    if arg and arg.startswith("@"):
        try:
            return open(arg[1:]).read().strip()
        except OSError:
            return None
    return arg


def container_credentials(state: State, authorization, now: float) -> tuple:
    """The EKS Pod Identity Agent: (status, JSON object)."""
    expected = expected_token(state.args.pod_identity_token)
    if not authorization:
        state.bump("container_rejected")
        return 400, {"message": "Service account token cannot be empty"}
    if not expected or authorization.strip() != expected:
        state.bump("container_rejected")
        return 403, {"message": "Service account token is not valid"}
    key_id, secret, token, expiry = issue_temporary(state, now)
    state.bump("container_credentials_issued")
    expiration = dt.datetime.fromtimestamp(expiry, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return 200, {"AccessKeyId": key_id, "SecretAccessKey": secret, "Token": token,
                 "AccountId": "123456789012", "Expiration": expiration}


def sts(state: State, form: dict, now: float) -> tuple:
    get = lambda k: (form.get(k) or [None])[0]  # noqa: E731
    action = get("Action")
    if action != "AssumeRoleWithWebIdentity":
        return sts_error("InvalidAction", f"Could not find operation {action} for version {get('Version') or 'NO_VERSION_SPECIFIED'}")
    if get("Version") != "2011-06-15":
        return sts_error("InvalidAction", f"Could not find operation {action} for version {get('Version') or 'NO_VERSION_SPECIFIED'}")
    for k in ("RoleArn", "RoleSessionName", "WebIdentityToken"):
        if not get(k):
            return sts_error("ValidationError", f"1 validation error detected: Value null at '{k[0].lower() + k[1:]}' failed to satisfy constraint: Member must not be null")
    duration = get("DurationSeconds")
    if duration is not None and (not duration.isdigit() or not 900 <= int(duration) <= 43200):
        return sts_error("ValidationError", f"1 validation error detected: Value '{duration}' at 'durationSeconds' failed to satisfy constraint: Member must have value {'greater' if not duration.isdigit() or int(duration) < 900 else 'less'} than or equal to {900 if not duration.isdigit() or int(duration) < 900 else 43200}")
    expected = expected_token(state.args.web_identity_token)
    if not expected or get("WebIdentityToken").strip() != expected:
        state.bump("sts_rejected")
        return sts_error("InvalidIdentityToken", "Couldn't retrieve verification key from your identity provider,  please reference AssumeRoleWithWebIdentity documentation for requirements")
    role = get("RoleArn")
    if state.args.role_arn and role != state.args.role_arn:
        state.bump("sts_rejected")
        return sts_error("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", 403)
    key_id, secret, token, expiry = issue_temporary(state, now)
    state.bump("sts_credentials_issued")
    session = get("RoleSessionName")
    role_name = role.rsplit("/", 1)[-1]
    account = role.split(":")[4] if role.count(":") >= 5 else "123456789012"
    expiration = dt.datetime.fromtimestamp(expiry, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = f"""<AssumeRoleWithWebIdentityResponse xmlns="{STS_NS}">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:default:modelgate</SubjectFromWebIdentityToken>
    <Audience>sts.amazonaws.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::{account}:assumed-role/{escape(role_name)}/{escape(session)}</Arn>
      <AssumedRoleId>AROA{_rand(string.ascii_uppercase + "234567", 17)}:{escape(session)}</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>{token}</SessionToken>
      <SecretAccessKey>{secret}</SecretAccessKey>
      <Expiration>{expiration}</Expiration>
      <AccessKeyId>{key_id}</AccessKeyId>
    </Credentials>
    <Provider>arn:aws:iam::{account}:oidc-provider/oidc.eks.{state.args.region}.amazonaws.com/id/MOCK</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata>
    <RequestId>{uuid.uuid4()}</RequestId>
  </ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>
"""
    return 200, body


# ---------------------------------------------------------------- Converse


KNOB_WORDS = ("tool", "thinking", "cache", "stream_error", "guardrail", "slow")


def knobs_of(text: str) -> dict:
    k = {w: bool(re.search(rf"(?<![\w=]){w}(?![\w=])", text)) for w in KNOB_WORDS}
    m = re.search(r"\bcode=([A-Za-z]+)", text)
    k["code"] = m.group(1) if m else None
    return k


def block_text(block: dict) -> str:
    """All text inside one content block (text, toolResult text/json, reasoning)."""
    if not isinstance(block, dict):
        return ""
    out = []
    if isinstance(block.get("text"), str):
        out.append(block["text"])
    tr = block.get("toolResult")
    if isinstance(tr, dict):
        for c in tr.get("content") or []:
            if isinstance(c, dict):
                if isinstance(c.get("text"), str):
                    out.append(c["text"])
                if "json" in c:
                    out.append(json.dumps(c["json"]))
    tu = block.get("toolUse")
    if isinstance(tu, dict):
        out.append(json.dumps(tu.get("input")))
    return " ".join(out)


def validate(req: dict) -> None:
    messages = req.get("messages")
    if not isinstance(messages, list):
        raise validation("1 validation error detected: Value null at 'messages' failed to satisfy constraint: Member must not be null")
    if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise validation("A conversation must start with a user message. Try again with a conversation that starts with a user message.")
    inf = req.get("inferenceConfig") or {}
    mt = inf.get("maxTokens") if isinstance(inf, dict) else None
    if mt is not None and (not isinstance(mt, int) or mt < 1):
        raise validation(f"1 validation error detected: Value '{mt}' at 'inferenceConfig.maxTokens' failed to satisfy constraint: Member must have value greater than or equal to 1")
    malformed = validation("Malformed input request, please reformat your input and try again.")
    if "system" in req and not isinstance(req["system"], list):
        raise malformed
    if "toolConfig" in req and not (isinstance(req["toolConfig"], dict) and isinstance(req["toolConfig"].get("tools"), list)):
        raise malformed
    for msg in messages:
        for b in (msg.get("content") if isinstance(msg, dict) and isinstance(msg.get("content"), list) else []):
            # a ContentBlock is a union: an object with exactly one known member
            if not isinstance(b, dict) or len(b) != 1 or next(iter(b)) not in CONTENT_BLOCK_MEMBERS:
                raise malformed
            kind, v = next(iter(b.items()))
            if (kind == "text" and not isinstance(v, str)) or (kind != "text" and not isinstance(v, dict)):
                raise malformed
    has_tool_blocks = False
    prev_tool_uses: list = []
    prev_role = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
            raise validation(f"1 validation error detected: Value '{msg.get('role') if isinstance(msg, dict) else None}' at 'messages.{i + 1}.member.role' failed to satisfy constraint: Member must satisfy enum value set: [user, assistant]")
        role = msg["role"]
        if role == prev_role:
            raise validation("A conversation must alternate between user and assistant roles. Make sure the conversation alternates between user and assistant roles and try again.")
        content = msg.get("content")
        if not isinstance(content, list) or not content:
            raise validation(f"The content field in the Message object at messages.{i} is empty. Add a ContentBlock object to the content field and try again.")
        uses = [b["toolUse"].get("toolUseId") for b in content if isinstance(b, dict) and isinstance(b.get("toolUse"), dict)]
        results = [b["toolResult"].get("toolUseId") for b in content if isinstance(b, dict) and isinstance(b.get("toolResult"), dict)]
        has_tool_blocks |= bool(uses or results)
        if role == "user":
            if len(results) > len(prev_tool_uses):
                raise validation(f"The number of toolResult blocks at messages.{i}.content exceeds the number of toolUse blocks of previous turn.")
            missing = [u for u in prev_tool_uses if u not in results]
            if prev_tool_uses and missing:
                raise validation(f"Expected toolResult blocks at messages.{i}.content for the following Ids: {', '.join(map(str, missing))}")
            prev_tool_uses = []
        else:
            prev_tool_uses = uses
        prev_role = role
    if has_tool_blocks and not isinstance(req.get("toolConfig"), dict):
        raise validation("The toolConfig field must be defined when using toolUse and toolResult content blocks.")


def check_reasoning_signatures(state: State, req: dict) -> None:
    for i, msg in enumerate(req.get("messages") or []):
        if msg.get("role") != "assistant":
            continue
        for j, b in enumerate(msg.get("content") or []):
            rc = b.get("reasoningContent") if isinstance(b, dict) else None
            if not isinstance(rc, dict) or "reasoningText" not in rc:
                continue
            rt = rc["reasoningText"] if isinstance(rc["reasoningText"], dict) else {}
            sig = rt.get("signature")
            with state.lock:
                known = sig in state.signatures
            if not known:
                state.bump("reasoning_signature_failures")
                raise validation(f"The model returned the following errors: messages.{i}.content.{j}: Invalid `signature` in `thinking` block")
            state.bump("reasoning_signatures_verified")


def plan_answer(req: dict, knobs: dict, last_text: str) -> dict:
    """The answer's content blocks, stop reason and usage, shared by both endpoints."""
    all_text = " ".join(block_text(b) for m in req.get("messages") or [] for b in (m.get("content") or []))
    all_text += " ".join(s.get("text", "") for s in (req.get("system") or []) if isinstance(s, dict))
    input_tokens = max(1, len(all_text) // 4)
    blocks = []
    stop = "end_turn"
    if knobs["thinking"]:
        blocks.append({"reasoningContent": {"reasoningText": {
            "text": f"The user asked: {last_text}. I will answer briefly.",
            "signature": base64.b64encode(os.urandom(48)).decode()}}})
    if knobs["guardrail"]:
        blocks = [{"text": GUARDRAIL_TEXT}]
        stop = "guardrail_intervened"
    else:
        answer = f"mock answer to: {last_text}"
        blocks.append({"text": answer})
        tools = ((req.get("toolConfig") or {}).get("tools") or []) if isinstance(req.get("toolConfig"), dict) else []
        spec = next((t["toolSpec"] for t in tools if isinstance(t, dict) and isinstance(t.get("toolSpec"), dict)), None)
        if knobs["tool"] and spec:
            blocks.append({"toolUse": {"toolUseId": "tooluse_" + _rand(string.ascii_letters + string.digits, 22),
                                       "name": spec.get("name"), "input": mock_input(spec)}})
            stop = "tool_use"
    out_text = " ".join(block_text(b) for b in blocks)
    output_tokens = max(1, len(out_text) // 4) + (20 if knobs["thinking"] else 0)
    usage = {"inputTokens": input_tokens, "outputTokens": output_tokens}
    total = input_tokens + output_tokens
    if knobs["cache"]:
        usage["cacheReadInputTokens"] = CACHE_READ
        usage["cacheWriteInputTokens"] = CACHE_WRITE
        total += CACHE_READ + CACHE_WRITE
    usage["totalTokens"] = total
    return {"blocks": blocks, "stop": stop, "usage": usage}


def mock_input(spec: dict) -> dict:
    """Arguments for a tool: each required property gets a trivial value of its type."""
    schema = (spec.get("inputSchema") or {}).get("json") or {}
    return trivial_object(schema)


def trivial_object(schema) -> dict:
    if not isinstance(schema, dict):
        return {}
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    out = {}
    for name in schema.get("required") or list(props)[:1]:
        out[name] = trivial_value(props.get(name) or {})
    return out


def trivial_value(s) -> object:
    t = s.get("type") if isinstance(s, dict) else None
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "string")
    if isinstance(s, dict) and s.get("enum"):
        return s["enum"][0]
    return {"integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}.get(
        t if isinstance(t, str) else "", "mock") if t != "object" else trivial_object(s)


def pieces(s: str, n: int) -> list:
    """s in n roughly equal pieces (at least one)."""
    if not s:
        return [""]
    step = max(1, -(-len(s) // n))
    return [s[i:i + step] for i in range(0, len(s), step)]


def stream_frames(state: State, plan: dict, knobs: dict, started: float):
    yield event_frame("messageStart", {"role": "assistant"})
    first_text = True
    for idx, b in enumerate(plan["blocks"]):
        if "reasoningContent" in b:
            rt = b["reasoningContent"]["reasoningText"]
            for p in pieces(rt["text"], 3):
                yield event_frame("contentBlockDelta", {"contentBlockIndex": idx, "delta": {"reasoningContent": {"text": p}}})
            yield event_frame("contentBlockDelta", {"contentBlockIndex": idx, "delta": {"reasoningContent": {"signature": rt["signature"]}}})
        elif "toolUse" in b:
            tu = b["toolUse"]
            yield event_frame("contentBlockStart", {"contentBlockIndex": idx, "start": {"toolUse": {"toolUseId": tu["toolUseId"], "name": tu["name"]}}})
            for p in pieces(json.dumps(tu["input"], separators=(",", ":")), 3):
                yield event_frame("contentBlockDelta", {"contentBlockIndex": idx, "delta": {"toolUse": {"input": p}}})
        else:
            words = re.findall(r"\S+\s*", b["text"])
            per = max(1, len(words) // 4)
            chunks = ["".join(words[k:k + per]) for k in range(0, len(words), per)]
            for c in chunks:
                yield event_frame("contentBlockDelta", {"contentBlockIndex": idx, "delta": {"text": c}})
                if first_text and knobs["stream_error"]:
                    state.bump("stream_errors_sent")
                    yield exception_frame("throttlingException", ERROR_MESSAGES["ThrottlingException"])
                    return
                first_text = False
        yield event_frame("contentBlockStop", {"contentBlockIndex": idx})
    yield event_frame("messageStop", {"stopReason": plan["stop"]})
    yield event_frame("metadata", {"usage": plan["usage"], "metrics": {"latencyMs": int((time.time() - started) * 1000) + 1}})


def converse(state: State, model_id: str, body: bytes, stream: bool, started: float):
    """Returns (status, headers, body bytes or an iterator of frames)."""
    try:
        req = json.loads(body or b"null")
    except ValueError:
        raise validation("Malformed input request, please reformat your input and try again.") from None
    if not isinstance(req, dict):
        raise validation("Malformed input request, please reformat your input and try again.")
    validate(req)
    last_user = next((m for m in reversed(req["messages"]) if m.get("role") == "user"), {})
    last_text = " ".join(b["text"] for b in last_user.get("content") or [] if isinstance(b, dict) and isinstance(b.get("text"), str))
    knobs = knobs_of(last_text)
    if knobs["code"]:
        code = knobs["code"]
        raise AwsError(ERROR_STATUS.get(code, 400), code, ERROR_MESSAGES.get(code, f"mock {code}"))
    check_reasoning_signatures(state, req)
    plan = plan_answer(req, knobs, last_text)
    for b in plan["blocks"]:
        if "reasoningContent" in b:
            with state.lock:
                state.signatures.add(b["reasoningContent"]["reasoningText"]["signature"])
    if knobs["slow"]:
        time.sleep(0.2)
    state.bump("converse_stream" if stream else "converse")
    if stream:
        frames = stream_frames(state, plan, knobs, started)
        if knobs["slow"]:
            frames = _paced(frames, 0.2)
        return 200, {"Content-Type": "application/vnd.amazon.eventstream"}, frames
    answer = {
        "output": {"message": {"role": "assistant", "content": plan["blocks"]}},
        "stopReason": plan["stop"],
        "usage": plan["usage"],
        "metrics": {"latencyMs": int((time.time() - started) * 1000) + 1},
    }
    return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode()


def _paced(frames, delay):
    for i, f in enumerate(frames):
        if i:
            time.sleep(delay)
        yield f


# ---------------------------------------------------------------- HTTP


ROUTE = re.compile(r"^/model/([^/]+)/(converse|converse-stream)$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-bedrock"
    state: State = None  # set by main

    def log_message(self, *_):
        pass

    def do_GET(self):
        self.handle_any()

    def do_POST(self):
        self.handle_any()

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def send(self, status: int, body: bytes, headers: dict):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj, headers=None):
        self.send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def send_stream(self, status: int, headers: dict, chunks):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for c in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.state.bump("streams_cancelled")
            self.close_connection = True

    def handle_any(self):
        st = self.state
        started = time.time()
        body = self.read_body()
        split = urlsplit(self.path)
        path = split.path
        if path.startswith("/_mock/"):
            return self.mock_endpoint(path)
        record = {
            "time": started, "method": self.command, "path": path, "query": split.query,
            "headers": {k.lower(): ", ".join(self.headers.get_all(k)) for k in dict.fromkeys(self.headers.keys())},
            "body": body.decode("utf-8", "replace"),
        }
        with st.lock:
            st.requests.append(record)
        request_id = str(uuid.uuid4())
        try:
            if self.command == "POST" and path == "/":
                form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
                if not form and split.query:
                    form = parse_qs(split.query, keep_blank_values=True)
                status, xml = sts(st, form, time.time())
                return self.send(status, xml.encode(), {"Content-Type": "text/xml", "x-amzn-RequestId": request_id})
            if self.command == "GET" and path == "/v1/credentials":
                status, answer = container_credentials(st, self.headers.get("Authorization"), time.time())
                return self.send_json(status, answer)
            m = ROUTE.match(path)
            if self.command != "POST" or not m:
                raise AwsError(404, "UnknownOperationException", "", CORAL_SERVICE)
            now = time.time()
            record["auth"] = {"checked_at": now, "ok": False}
            try:
                key = verify_sigv4(st, self.command, self.path, self.headers, body, now)
            except AwsError as e:
                record["auth"]["error"] = e.error_type
                st.bump("signature_failures" if e.error_type == "InvalidSignatureException" else "auth_failures")
                st.bump(f"auth_{e.error_type}")
                raise
            record["auth"].update(ok=True, access_key=key)
            status, headers, out = converse(st, unquote(m.group(1)), body, m.group(2) == "converse-stream", started)
            headers["x-amzn-RequestId"] = request_id
            if isinstance(out, bytes):
                return self.send(status, out, headers)
            return self.send_stream(status, headers, out)
        except AwsError as e:
            st.bump("errors")
            self.send_json(e.status, {"message": e.message} if e.message else {"Output": {"__type": "com.amazon.coral.service#UnknownOperationException"}, "Version": "1.0"},
                           {"x-amzn-ErrorType": f"{e.error_type}:{e.namespace}", "x-amzn-RequestId": request_id})
        except Exception as e:  # a mock bug or input it did not foresee: say so, never hang up
            st.bump("mock_internal_errors")
            self.send_json(500, {"message": f"mock_bedrock internal error: {e!r}"},
                           {"x-amzn-ErrorType": f"InternalServerException:{CORAL_BEDROCK}", "x-amzn-RequestId": request_id})

    def mock_endpoint(self, path: str):
        st = self.state
        if path == "/_mock/requests":
            with st.lock:
                return self.send_json(200, list(st.requests))
        if path == "/_mock/stats":
            with st.lock:
                return self.send_json(200, dict(st.stats, temp_credentials_live=sum(1 for c in st.temp_creds.values() if c[2] > time.time())))
        if path == "/_mock/reset" and self.command == "POST":
            st.reset()
            return self.send_json(200, {"ok": True})
        self.send_json(404, {"message": "unknown mock endpoint"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--access-key", default="AKIAMOCKSTATICKEY000")
    p.add_argument("--secret-key", default="mock-static-secret-key")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--web-identity-token", default=None)
    p.add_argument("--role-arn", default=None)
    p.add_argument("--pod-identity-token", default=None)
    p.add_argument("--sts-ttl", type=float, default=3600)
    p.add_argument("--exit-on-stdin-eof", action="store_true")
    args = p.parse_args(argv)
    Handler.state = State(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
    if args.exit_on_stdin_eof:
        def watch():
            while sys.stdin.buffer.read(4096):
                pass
            os._exit(0)
        threading.Thread(target=watch, daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
