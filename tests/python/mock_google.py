"""A mock of Google's OAuth2 token endpoint, the GCE/GKE metadata server, the Gemini API
(Generative Language, API key) and Vertex AI (Gemini models, and Anthropic models through
rawPredict), speaking the real wire formats and checking what the real services check, for
the gateway's integration tests.

Wire formats: Google's OAuth2 service-account (JWT-bearer, RFC 7523) and metadata-server
docs, the Gemini API reference (GenerateContentResponse, streaming as SSE), python-genai's
types, Vertex AI's Claude docs (rawPredict/streamRawPredict, `anthropic_version:
vertex-2023-10-16`) and Anthropic's Messages streaming reference. Error envelopes as Google
sends them: `{"error": {"code", "message", "status", "details"?}}`.

    python mock_google.py [--write-service-account PATH] [--project P] [--api-key KEY]
        [--token-ttl SECONDS] [--port N] [--exit-on-stdin-eof]

Prints exactly one line `listening 127.0.0.1:<port>` on stdout (after the key file is
written), then serves until killed.

Endpoints
- `POST /token` (form): `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=JWT`.
  The JWT is verified with google-auth (`google.auth.jwt.decode`, the key file's public key
  under its `private_key_id`, audience = this `/token` URL (the key file's token_uri) or
  `https://oauth2.googleapis.com/token` (what google-auth always signs for), 30 s clock skew); iss must be the
  key file's client_email, `scope` must include cloud-platform, exp - iat ≤ 3600 →
  `{"access_token", "expires_in", "token_type": "Bearer"}`. Else 400 with Google's
  `{"error", "error_description"}` (`invalid_grant` "Invalid JWT Signature.", …).
- `GET /computeMetadata/v1/instance/service-accounts/default/token` (also `/email`, and
  `/computeMetadata/v1/project/project-id`): header `Metadata-Flavor: Google` required (else
  403) → the same token JSON (workload identity on GKE).
- Gemini API: `POST /v1beta/models/{m}:generateContent`, `:streamGenerateContent?alt=sse`
  (`/v1/` too); key in `x-goog-api-key` or `?key=`: missing → 403 PERMISSION_DENIED, wrong →
  400 INVALID_ARGUMENT "API key not valid. Please pass a valid API key.".
- Vertex: `POST /v1/projects/{p}/locations/{l}/publishers/google/models/{m}:generateContent`
  | `:streamGenerateContent?alt=sse`, and `/publishers/anthropic/models/{m}:rawPredict` |
  `:streamRawPredict`; `Authorization: Bearer <token this mock issued, not expired>` (else 401
  UNAUTHENTICATED); project must be the key file's (else 403 PERMISSION_DENIED). rawPredict
  takes an Anthropic Messages body without `model` and with `"anthropic_version":
  "vertex-2023-10-16"` (400 invalid_request_error otherwise) and answers as Anthropic does
  (message JSON, or the SSE events message_start … message_stop).
- `GET /_mock/requests`: JSON list of recorded requests `{time, method, path, query,
  headers (lower-case names), body, auth?: {checked_at, ok, error?}}`; `GET /_mock/stats`:
  counters (`tokens_issued`, `tokens_issued_jwt`, `tokens_issued_metadata`, `token_grants`,
  `token_failures`, `metadata_forbidden`, `api_key_failures`, `bearer_failures`,
  `thought_signatures_verified`, `thought_signatures_dummy`, `thought_signature_failures`,
  `thinking_signatures_verified`, `thinking_signature_failures`, `gemini`, `vertex_gemini`,
  `vertex_anthropic`, `errors`, `streams_cancelled`, `mock_internal_errors`);
  `POST /_mock/reset`: clears both (issued tokens and signatures stay valid).

Knobs, words in the text of the last user turn (its text parts / text blocks):

| knob | meaning |
|---|---|
| `tool` | Gemini: a functionCall part for the first declared function, with a `thoughtSignature` (random base64); Anthropic: a tool_use block for the first tool |
| `thinking` | Gemini: thoughtsTokenCount, and thought parts when `thinkingConfig.includeThoughts`; Anthropic: a thinking block with a signature, which must come back unchanged on later turns |
| `cache` | Gemini: cachedContentTokenCount 64 (part of promptTokenCount); Anthropic: cache_read_input_tokens 64, cache_creation_input_tokens 32 |
| `safety` | Gemini: finishReason SAFETY with safetyRatings, no content |
| `blocked` | Gemini: promptFeedback.blockReason SAFETY, no candidates |
| `json` | Gemini: with `responseMimeType: application/json`, the text is a JSON object with each required property of the schema given a trivial value |
| `code=429` | Google's RESOURCE_EXHAUSTED envelope (Vertex's quota wording for Anthropic models) |
| `code=503`, `code=500`, `code=400`, `code=403`, `code=404` | the matching Google envelope (UNAVAILABLE "The model is overloaded. Please try again later.", …) |
| `code=529` | Anthropic models: Anthropic's overloaded_error body |
| `slow` | 200 ms before the answer and between stream chunks |

Thought signatures (Gemini 3 rule): in the current turn (the contents after the last user
content with a text part), every model content's first functionCall part must carry a
thoughtSignature this mock issued for that function, unchanged (the documented dummy values
`skip_thought_signature_validator` and `context_engineering_is_the_way_to_go` are accepted and
counted) — else 400 INVALID_ARGUMENT with Gemini's (or Vertex's) message. Also validated:
contents present, roles user/model (Vertex requires the role), a functionResponse turn must
follow a functionCall turn with as many parts and matching names.

Answers say `mock answer to: <last user text>`; prompt tokens ≈ len(all request text)/4.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import string
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import exceptions as gexc
from google.auth import jwt as gjwt

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# The audience Google's token endpoint answers to; google-auth always signs for it, whatever
# the key file's token_uri (google/oauth2/service_account.py), other clients sign for token_uri.
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
VERTEX_VERSION = "vertex-2023-10-16"
DUMMY_SIGNATURES = ("skip_thought_signature_validator", "context_engineering_is_the_way_to_go")
CACHE_READ, CACHE_WRITE, THOUGHT_TOKENS = 64, 32, 20

MSG_UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
    "or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
MSG_SHORT_LIVED = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)
CODES = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting"),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
}


class GoogleError(Exception):
    def __init__(self, code: int, message: str, status: str | None = None, details=None):
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or CODES.get(code, ("UNKNOWN", ""))[0]
        self.details = details

    def body(self) -> dict:
        e = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            e["details"] = self.details
        return {"error": e}


class AnthropicError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def body(self) -> dict:
        return {"type": "error", "error": {"type": self.kind, "message": self.message}}


def invalid(message: str) -> GoogleError:
    return GoogleError(400, message, "INVALID_ARGUMENT")


def _rand(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.requests: list = []
        self.stats: dict = {}
        self.tokens: dict = {}  # access token -> expiry epoch
        self.sa: dict | None = None  # the written service-account key (with the public key)
        self.public_pem: str | None = None
        self.token_uri = ""
        self.thought_signatures: dict = {}  # signature -> function name
        self.thinking_signatures: set = set()  # Anthropic thinking signatures

    def bump(self, name: str, by: int = 1):
        with self.lock:
            self.stats[name] = self.stats.get(name, 0) + by

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.stats.clear()

    def issue_token(self, source: str) -> dict:
        token = "ya29.mock-" + _rand(string.ascii_letters + string.digits + "-_", 60)
        ttl = self.args.token_ttl
        with self.lock:
            self.tokens[token] = time.time() + ttl
        self.bump("tokens_issued")
        self.bump(f"tokens_issued_{source}")
        return {"access_token": token, "expires_in": int(ttl), "token_type": "Bearer"}


def write_service_account(state: State, path: str, project: str):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    state.public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    email = f"modelgate-test@{project}.iam.gserviceaccount.com"
    state.sa = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**21 - 10**20) + 10**20),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": state.token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email.replace('@', '%40')}",
        "universe_domain": "googleapis.com",
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state.sa, f, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------- OAuth2


def token_grant(state: State, form: dict) -> tuple:
    get = lambda k: (form.get(k) or [None])[0]  # noqa: E731
    grant = get("grant_type")
    if grant != JWT_BEARER:
        return 400, {"error": "unsupported_grant_type", "error_description": f"Invalid grant_type: {grant or ''}"}
    assertion = get("assertion")
    if not assertion:
        return 400, {"error": "invalid_request", "error_description": "Missing required parameter: assertion"}
    sa = state.sa
    bad = lambda d, e="invalid_grant": (400, {"error": e, "error_description": d})  # noqa: E731
    if sa is None:
        return bad("Invalid grant: account not found")
    try:
        claims = gjwt.decode(assertion, certs={sa["private_key_id"]: state.public_pem},
                             audience=[state.token_uri, GOOGLE_TOKEN_URI], clock_skew_in_seconds=30)
    except (gexc.MalformedError, ValueError) as e:
        if "audience" in str(e).lower():
            return bad("Invalid JWT: Failed audience check.")
        return bad("Invalid JWT Signature.")
    except gexc.InvalidValue as e:
        msg = str(e)
        if "audience" in msg:
            return bad("Invalid JWT: Failed audience check.")
        if "expired" in msg or "too early" in msg:
            return bad(MSG_SHORT_LIVED)
        return bad("Invalid JWT Signature.")
    if claims.get("iss") != sa["client_email"]:
        return bad("Invalid grant: account not found")
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, (int, float)) or not isinstance(exp, (int, float)) or exp - iat > 3600 or exp <= iat:
        return bad(MSG_SHORT_LIVED)
    scopes = str(claims.get("scope") or "").split()
    if CLOUD_PLATFORM not in scopes:
        return bad("Invalid OAuth scope or ID token audience provided.", "invalid_scope")
    return 200, state.issue_token("jwt")


# ---------------------------------------------------------------- shared answer helpers


def knobs_of(text: str) -> dict:
    k = {w: bool(re.search(rf"(?<![\w=]){w}(?![\w=])", text))
         for w in ("tool", "thinking", "cache", "safety", "blocked", "json", "slow")}
    m = re.search(r"\bcode=(\d{3})\b", text)
    k["code"] = int(m.group(1)) if m else None
    return k


def trivial_object(schema) -> dict:
    if not isinstance(schema, dict):
        return {}
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    req = schema.get("required") if isinstance(schema.get("required"), list) else list(props)[:1]
    return {name: trivial_value(props.get(name) or {}) for name in req if isinstance(name, str)}


def trivial_value(s):
    t = s.get("type") if isinstance(s, dict) else None
    if isinstance(t, list):
        t = next((x for x in t if str(x).lower() != "null"), "string")
    t = str(t or "string").lower()
    if isinstance(s, dict) and isinstance(s.get("enum"), list) and s["enum"]:
        return s["enum"][0]
    if t == "object":
        return trivial_object(s)
    return {"integer": 1, "number": 1.5, "boolean": True, "array": []}.get(t, "mock")


def text_pieces(text: str, n: int = 4) -> list:
    words = re.findall(r"\S+\s*", text) or [text]
    per = max(1, len(words) // n)
    return ["".join(words[k:k + per]) for k in range(0, len(words), per)]


def all_strings(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        return " ".join(all_strings(x) for k, x in v.items() if k not in ("thoughtSignature", "signature", "data"))
    if isinstance(v, list):
        return " ".join(all_strings(x) for x in v)
    return ""


# ---------------------------------------------------------------- Gemini


def validate_gemini(state: State, req: dict, vertex: bool) -> list:
    contents = req.get("contents")
    if not isinstance(contents, list) or not contents:
        raise invalid("* GenerateContentRequest.contents: contents is not specified\n")
    v1 = "google.cloud.aiplatform.v1" if vertex else "google.ai.generativelanguage.v1beta"
    for field, kind, typ in (("tools", list, "Tool"), ("generationConfig", dict, "GenerationConfig"),
                             ("systemInstruction", dict, "Content"), ("safetySettings", list, "SafetySetting")):
        if field in req and not isinstance(req[field], kind):
            raise invalid(f"Invalid value at '{field}' (type.googleapis.com/{v1}.{typ}), {json.dumps(req[field])}")
    for i, c in enumerate(contents):
        for j, p in enumerate(c.get("parts") or [] if isinstance(c, dict) and isinstance(c.get("parts"), list) else []):
            if not isinstance(p, dict):
                raise invalid(f"Invalid value at 'contents[{i}].parts[{j}]' (type.googleapis.com/{v1}.Part), {json.dumps(p)}")
            if "text" in p and not isinstance(p["text"], str):
                raise invalid(f"Invalid value at 'contents[{i}].parts[{j}].text' (TYPE_STRING), {json.dumps(p['text'])}")
            for k in ("functionCall", "functionResponse", "inlineData", "fileData"):
                if k in p and not isinstance(p[k], dict):
                    raise invalid(f"Invalid value at 'contents[{i}].parts[{j}].{k[0].lower() + k[1:]}' (type.googleapis.com/{v1}.{k[0].upper() + k[1:]}), {json.dumps(p[k])}")
    prev_calls: list | None = None
    for i, c in enumerate(contents):
        if not isinstance(c, dict) or not isinstance(c.get("parts"), list) or not c["parts"]:
            raise invalid(f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n")
        role = c.get("role")
        if role not in ("user", "model") and not (role is None and not vertex):
            raise invalid("Please use a valid role: user, model.")
        parts = [p for p in c["parts"] if isinstance(p, dict)]
        calls = [p["functionCall"].get("name") for p in parts if isinstance(p.get("functionCall"), dict)]
        responses = [p["functionResponse"].get("name") for p in parts if isinstance(p.get("functionResponse"), dict)]
        if responses:
            if not prev_calls:
                raise invalid("Please ensure that function response turn comes immediately after a function call turn.")
            if len(responses) != len(prev_calls):
                raise invalid("Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn.")
            unknown = [n for n in responses if n not in prev_calls]
            if unknown:
                raise invalid(f"Please ensure that function response names match the function call names of the function call turn: {unknown[0]} was not called.")
        prev_calls = calls if (role or "user") == "model" else None
    return contents


def check_thought_signatures(state: State, contents: list, vertex: bool):
    """Gemini 3: in the current turn, each model step's first functionCall part needs the
    signature the model gave it."""
    start = 0
    for i, c in enumerate(contents):
        if (c.get("role") or "user") == "user" and any(isinstance(p, dict) and isinstance(p.get("text"), str) for p in c["parts"]):
            start = i
    for i in range(start, len(contents)):
        c = contents[i]
        if c.get("role") != "model":
            continue
        first = next((p for p in c["parts"] if isinstance(p, dict) and isinstance(p.get("functionCall"), dict)), None)
        if first is None:
            continue
        name = first["functionCall"].get("name")
        sig = first.get("thoughtSignature")
        if sig in DUMMY_SIGNATURES:
            state.bump("thought_signatures_dummy")
            continue
        with state.lock:
            known = state.thought_signatures.get(sig) if isinstance(sig, str) else None
        if sig is None:
            state.bump("thought_signature_failures")
            if vertex:
                raise invalid(f"Unable to submit request because function call `{name}` in the {i + 1}. content block is missing a `thought_signature`. Learn more: https://docs.cloud.google.com/vertex-ai/generative-ai/docs/thought-signatures")
            raise invalid(f"Function call is missing a thought_signature in functionCall parts. This is required for tools to work correctly, and missing thought_signature may lead to degraded model performance. Additional data, function call `default_api:{name}` , position {i + 1}. Please refer to https://ai.google.dev/gemini-api/docs/thought-signatures for more details.")
        if known != name:
            state.bump("thought_signature_failures")
            raise invalid("Corrupted thought signature.")
        state.bump("thought_signatures_verified")


def gemini_plan(state: State, req: dict, knobs: dict, last_text: str) -> dict:
    prompt = max(1, len(all_strings([req.get("contents"), req.get("systemInstruction"), req.get("tools")])) // 4)
    if knobs["cache"]:
        prompt += CACHE_READ
    gc = req.get("generationConfig") if isinstance(req.get("generationConfig"), dict) else {}
    tc = gc.get("thinkingConfig") if isinstance(gc.get("thinkingConfig"), dict) else {}
    parts = []
    if knobs["thinking"] and tc.get("includeThoughts"):
        parts.append({"text": f"**Answering**\n\nThe user asked: {last_text}.", "thought": True})
    decl = None
    for t in req.get("tools") or []:
        fds = t.get("functionDeclarations") if isinstance(t, dict) else None
        if isinstance(fds, list) and fds and isinstance(fds[0], dict):
            decl = fds[0]
            break
    if knobs["tool"] and decl:
        sig = base64.b64encode(os.urandom(64)).decode()
        with state.lock:
            state.thought_signatures[sig] = decl.get("name")
        schema = decl.get("parametersJsonSchema") or decl.get("parameters") or {}
        parts.append({"functionCall": {"name": decl.get("name"), "args": trivial_object(schema)}, "thoughtSignature": sig})
    elif knobs["json"] and gc.get("responseMimeType") == "application/json":
        schema = gc.get("responseJsonSchema") or gc.get("responseSchema") or {}
        parts.append({"text": json.dumps(trivial_object(schema))})
    else:
        parts.append({"text": f"mock answer to: {last_text}"})
    out = max(1, len(all_strings([p for p in parts if not p.get("thought")])) // 4)
    usage = {"promptTokenCount": prompt, "candidatesTokenCount": out}
    total = prompt + out
    if knobs["cache"]:
        usage["cachedContentTokenCount"] = CACHE_READ
    if knobs["thinking"]:
        usage["thoughtsTokenCount"] = THOUGHT_TOKENS
        total += THOUGHT_TOKENS
    usage["totalTokenCount"] = total
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    return {"parts": parts, "usage": usage}


SAFETY_RATINGS = [
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
]


def gemini(state: State, model: str, req: dict, stream: bool, vertex: bool):
    """Returns a list of GenerateContentResponse objects (one unless streaming)."""
    contents = validate_gemini(state, req, vertex)
    last_user = next((c for c in reversed(contents) if (c.get("role") or "user") == "user"
                      and any(isinstance(p, dict) and isinstance(p.get("text"), str) for p in c["parts"])), None)
    last_text = " ".join(p["text"] for p in (last_user or {}).get("parts", []) if isinstance(p, dict) and isinstance(p.get("text"), str))
    # Knobs ride in the last content only when it is the user's text turn (not a functionResponse).
    knobs = knobs_of(last_text if last_user is contents[-1] else "")
    if knobs["code"]:
        code = knobs["code"]
        if code == 429 and vertex:
            raise GoogleError(429, f"Quota exceeded for aiplatform.googleapis.com/generate_content_requests_per_minute_per_project_per_base_model with base model: {model}. Please submit a quota increase request. https://cloud.google.com/vertex-ai/docs/generative-ai/quotas-genai.")
        raise GoogleError(code, CODES.get(code, ("UNKNOWN", "mock error"))[1])
    check_thought_signatures(state, contents, vertex)
    if knobs["slow"]:
        time.sleep(0.2)
    base = {"modelVersion": model, "responseId": _rand(string.ascii_letters + string.digits, 22)}
    if vertex:
        base["createTime"] = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    plan = gemini_plan(state, req, knobs, last_text)
    if knobs["blocked"]:
        usage = {"promptTokenCount": plan["usage"]["promptTokenCount"], "totalTokenCount": plan["usage"]["promptTokenCount"]}
        return [dict({"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": SAFETY_RATINGS}, "usageMetadata": usage}, **base)]
    if knobs["safety"]:
        usage = dict(plan["usage"], candidatesTokenCount=0, totalTokenCount=plan["usage"]["promptTokenCount"])
        return [dict({"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": SAFETY_RATINGS}], "usageMetadata": usage}, **base)]
    if not stream:
        cand = {"content": {"role": "model", "parts": plan["parts"]}, "finishReason": "STOP", "index": 0}
        return [dict({"candidates": [cand], "usageMetadata": plan["usage"]}, **base)]
    chunks = []
    for p in plan["parts"]:
        if "text" in p:
            for piece in text_pieces(p["text"]):
                chunks.append(dict(p, text=piece))
        else:
            chunks.append(p)
    out, u = [], plan["usage"]
    for i, part in enumerate(chunks):
        last = i == len(chunks) - 1
        cand = {"content": {"role": "model", "parts": [part]}, "index": 0}
        if last:
            cand["finishReason"] = "STOP"
            usage = u
        else:
            usage = {"promptTokenCount": u["promptTokenCount"], "totalTokenCount": u["promptTokenCount"]}
        out.append(dict({"candidates": [cand], "usageMetadata": usage}, **base))
    return out


# ---------------------------------------------------------------- Anthropic on Vertex


def anthropic(state: State, model: str, req: dict, stream: bool):
    """Returns the message JSON, or a list of (event, data) for a stream, and the slow knob."""
    if "anthropic_version" not in req:
        raise AnthropicError(400, "invalid_request_error", "anthropic_version: Field required")
    if req["anthropic_version"] != VERTEX_VERSION:
        raise AnthropicError(400, "invalid_request_error", f"anthropic_version: Input should be '{VERTEX_VERSION}'")
    if "model" in req:
        raise AnthropicError(400, "invalid_request_error", "model: Extra inputs are not permitted")
    if not isinstance(req.get("max_tokens"), int):
        raise AnthropicError(400, "invalid_request_error", "max_tokens: Field required")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise AnthropicError(400, "invalid_request_error", "messages: Field required")
    prev_uses: list = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise AnthropicError(400, "invalid_request_error", f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = m.get("content")
        blocks = content if isinstance(content, list) else []
        if m["role"] == "user":
            for j, b in enumerate(blocks):
                if isinstance(b, dict) and b.get("type") == "tool_result" and b.get("tool_use_id") not in prev_uses:
                    raise AnthropicError(400, "invalid_request_error", f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {b.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message.")
            prev_uses = []
        else:
            prev_uses = [b.get("id") for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
            for j, b in enumerate(blocks):
                if isinstance(b, dict) and b.get("type") == "thinking":
                    with state.lock:
                        known = b.get("signature") in state.thinking_signatures
                    if not known:
                        state.bump("thinking_signature_failures")
                        raise AnthropicError(400, "invalid_request_error", f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block")
                    state.bump("thinking_signatures_verified")
    last = messages[-1]
    last_text = ""
    if last.get("role") == "user":
        c = last.get("content")
        last_text = c if isinstance(c, str) else " ".join(b.get("text", "") for b in c or [] if isinstance(b, dict) and b.get("type") == "text")
    knobs = knobs_of(last_text)
    if knobs["code"] == 429:
        raise GoogleError(429, f"Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model with base model: {model}. Please submit a quota increase request. https://cloud.google.com/vertex-ai/docs/generative-ai/quotas-genai.")
    if knobs["code"] == 529:
        raise AnthropicError(529, "overloaded_error", "Overloaded")
    if knobs["code"]:
        raise AnthropicError(knobs["code"], {400: "invalid_request_error", 500: "api_error"}.get(knobs["code"], "api_error"), "mock error")
    if knobs["slow"]:
        time.sleep(0.2)
    content = []
    if knobs["thinking"]:
        sig = base64.b64encode(os.urandom(64)).decode()
        with state.lock:
            state.thinking_signatures.add(sig)
        content.append({"type": "thinking", "thinking": f"The user asked: {last_text}.", "signature": sig})
    content.append({"type": "text", "text": f"mock answer to: {last_text}"})
    stop = "end_turn"
    tools = [t for t in req.get("tools") or [] if isinstance(t, dict) and t.get("name")]
    if knobs["tool"] and tools:
        content.append({"type": "tool_use", "id": "toolu_vrtx_" + _rand(string.ascii_letters + string.digits, 24),
                        "name": tools[0]["name"], "input": trivial_object(tools[0].get("input_schema"))})
        stop = "tool_use"
    input_tokens = max(1, len(all_strings([req.get("system"), messages, req.get("tools")])) // 4)
    output_tokens = max(1, len(all_strings(content)) // 4)
    usage = {"input_tokens": input_tokens,
             "cache_creation_input_tokens": CACHE_WRITE if knobs["cache"] else 0,
             "cache_read_input_tokens": CACHE_READ if knobs["cache"] else 0,
             "output_tokens": output_tokens}
    msg = {"id": "msg_vrtx_" + _rand(string.ascii_letters + string.digits, 24), "type": "message", "role": "assistant",
           "model": model, "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage}
    if not stream:
        return msg, knobs["slow"]
    start = dict(msg, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))
    events = [("message_start", {"type": "message_start", "message": start}), ("ping", {"type": "ping"})]
    for idx, b in enumerate(content):
        if b["type"] == "thinking":
            events.append(("content_block_start", {"type": "content_block_start", "index": idx, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}))
            for p in text_pieces(b["thinking"], 3):
                events.append(("content_block_delta", {"type": "content_block_delta", "index": idx, "delta": {"type": "thinking_delta", "thinking": p}}))
            events.append(("content_block_delta", {"type": "content_block_delta", "index": idx, "delta": {"type": "signature_delta", "signature": b["signature"]}}))
        elif b["type"] == "text":
            events.append(("content_block_start", {"type": "content_block_start", "index": idx, "content_block": {"type": "text", "text": ""}}))
            for p in text_pieces(b["text"]):
                events.append(("content_block_delta", {"type": "content_block_delta", "index": idx, "delta": {"type": "text_delta", "text": p}}))
        else:
            events.append(("content_block_start", {"type": "content_block_start", "index": idx, "content_block": dict(b, input={})}))
            raw = json.dumps(b["input"])
            for k in range(0, len(raw), max(1, len(raw) // 3)):
                events.append(("content_block_delta", {"type": "content_block_delta", "index": idx, "delta": {"type": "input_json_delta", "partial_json": raw[k:k + max(1, len(raw) // 3)]}}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": idx}))
    events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": output_tokens}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events, knobs["slow"]


# ---------------------------------------------------------------- HTTP


GEMINI_ROUTE = re.compile(r"^/(v1|v1beta)/models/([^/:]+):(generateContent|streamGenerateContent)$")
VERTEX_ROUTE = re.compile(r"^/(v1|v1beta1)/projects/([^/]+)/locations/([^/]+)/publishers/(google|anthropic)/models/([^/:]+):(\w+)$")
METADATA_PREFIX = "/computeMetadata/v1/"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-google"
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

    def send(self, status: int, body: bytes, content_type: str, extra=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj, extra=None):
        self.send(status, json.dumps(obj, indent=2).encode(), "application/json; charset=UTF-8", extra)

    def send_sse(self, chunks, slow: bool):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i, c in enumerate(chunks):
                if slow and i:
                    time.sleep(0.2)
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
        path, query = split.path, parse_qs(split.query)
        if path.startswith("/_mock/"):
            return self.mock_endpoint(path)
        record = {
            "time": started, "method": self.command, "path": path, "query": split.query,
            "headers": {k.lower(): ", ".join(self.headers.get_all(k)) for k in dict.fromkeys(self.headers.keys())},
            "body": body.decode("utf-8", "replace"),
        }
        with st.lock:
            st.requests.append(record)
        try:
            if path == "/token" and self.command == "POST":
                status, obj = token_grant(st, parse_qs(body.decode("utf-8", "replace")))
                st.bump("token_failures" if status != 200 else "token_grants")
                return self.send_json(status, obj, {"Cache-Control": "no-cache, no-store, max-age=0, must-revalidate"})
            if path.startswith(METADATA_PREFIX) and self.command == "GET":
                return self.metadata(path[len(METADATA_PREFIX):])
            m = GEMINI_ROUTE.match(path)
            if m and self.command == "POST":
                self.check_api_key(record, query)
                return self.gemini(m.group(2), m.group(3), query, body, vertex=False)
            m = VERTEX_ROUTE.match(path)
            if m and self.command == "POST":
                self.check_bearer(record, m.group(2), path)
                publisher, model, action = m.group(4), m.group(5), m.group(6)
                if publisher == "google" and action in ("generateContent", "streamGenerateContent"):
                    return self.gemini(model, action, query, body, vertex=True)
                if publisher == "anthropic" and action in ("rawPredict", "streamRawPredict"):
                    return self.anthropic(model, action == "streamRawPredict", body)
            raise GoogleError(404, f"The requested URL {path} was not found on this server.", "NOT_FOUND")
        except GoogleError as e:
            st.bump("errors")
            self.send_json(e.code, e.body())
        except AnthropicError as e:
            st.bump("errors")
            self.send_json(e.status, e.body())
        except Exception as e:  # a mock bug or input it did not foresee: say so, never hang up
            st.bump("mock_internal_errors")
            self.send_json(500, GoogleError(500, f"mock_google internal error: {e!r}").body())

    def metadata(self, rest: str):
        st = self.state
        if self.headers.get("metadata-flavor") != "Google":
            st.bump("metadata_forbidden")
            return self.send(403, b"Missing required header: Metadata-Flavor\n", "text/plain",
                             {"Metadata-Flavor": "Google"})
        hdr = {"Metadata-Flavor": "Google"}
        sa = st.sa or {"client_email": "default@mock-project.iam.gserviceaccount.com", "project_id": st.args.project}
        if rest == "instance/service-accounts/default/token":
            return self.send_json(200, st.issue_token("metadata"), hdr)
        if rest == "instance/service-accounts/default/email":
            return self.send(200, sa["client_email"].encode(), "application/text", hdr)
        if rest == "project/project-id":
            return self.send(200, sa["project_id"].encode(), "application/text", hdr)
        if rest == "":
            return self.send(200, b"instance/\nproject/\n", "application/text", hdr)
        return self.send(404, b"Not Found\n", "text/html", hdr)

    def check_api_key(self, record, query):
        key = self.headers.get("x-goog-api-key") or (query.get("key") or [None])[0]
        record["auth"] = {"checked_at": time.time(), "ok": False}
        if not key:
            self.state.bump("api_key_failures")
            record["auth"]["error"] = "missing"
            raise GoogleError(403, "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.", "PERMISSION_DENIED")
        if key != self.state.args.api_key:
            self.state.bump("api_key_failures")
            record["auth"]["error"] = "invalid"
            raise GoogleError(400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT", [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}])
        record["auth"]["ok"] = True

    def check_bearer(self, record, project, path):
        st = self.state
        now = time.time()
        record["auth"] = {"checked_at": now, "ok": False}
        auth = self.headers.get("authorization") or ""
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        with st.lock:
            expiry = st.tokens.get(token) if token else None
        reason = "CREDENTIALS_MISSING" if not token else "ACCESS_TOKEN_TYPE_UNSUPPORTED" if expiry is None else "ACCESS_TOKEN_EXPIRED" if now >= expiry else None
        if reason:
            st.bump("bearer_failures")
            record["auth"]["error"] = reason
            raise GoogleError(401, MSG_UNAUTHENTICATED, "UNAUTHENTICATED", [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                 "domain": "googleapis.com", "metadata": {"service": "aiplatform.googleapis.com", "method": "google.cloud.aiplatform.v1.PredictionService.GenerateContent"}}])
        sa_project = (st.sa or {}).get("project_id", st.args.project)
        if project != sa_project:
            record["auth"]["error"] = "PERMISSION_DENIED"
            raise GoogleError(403, f"Permission 'aiplatform.endpoints.predict' denied on resource '//aiplatform.googleapis.com{path.split(':')[0][3:]}' (or it may not exist).", "PERMISSION_DENIED")
        record["auth"]["ok"] = True

    def parse_json(self, body: bytes) -> dict:
        try:
            req = json.loads(body or b"null")
        except ValueError:
            req = None
        if not isinstance(req, dict):
            raise invalid(f"Invalid JSON payload received. Unexpected token.\n{body[:40].decode('utf-8', 'replace')}\n^")
        return req

    def gemini(self, model, action, query, body, vertex: bool):
        req = self.parse_json(body)
        stream = action == "streamGenerateContent"
        chunks = gemini(self.state, model, req, stream, vertex)
        self.state.bump("vertex_gemini" if vertex else "gemini")
        if not stream:
            return self.send_json(200, chunks[0])
        slow = knobs_of(" ".join(p.get("text", "") for p in req["contents"][-1]["parts"] if isinstance(p, dict) and isinstance(p.get("text"), str)))["slow"]
        if (query.get("alt") or [None])[0] == "sse":
            return self.send_sse([b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\r\n\r\n" for c in chunks], slow)
        return self.send_json(200, chunks)  # without alt=sse: one JSON array of the chunks

    def anthropic(self, model, stream: bool, body):
        try:
            req = json.loads(body or b"null")
        except ValueError:
            req = None
        if not isinstance(req, dict):
            raise AnthropicError(400, "invalid_request_error", "The request body is not valid JSON.")
        out, slow = anthropic(self.state, model, req, stream)
        self.state.bump("vertex_anthropic")
        if not stream:
            return self.send_json(200, out)
        self.send_sse([f"event: {e}\ndata: {json.dumps(d, separators=(',', ':'))}\n\n".encode() for e, d in out], slow)

    def mock_endpoint(self, path: str):
        st = self.state
        if path == "/_mock/requests":
            with st.lock:
                return self.send_json(200, list(st.requests))
        if path == "/_mock/stats":
            with st.lock:
                return self.send_json(200, dict(st.stats))
        if path == "/_mock/reset" and self.command == "POST":
            st.reset()
            return self.send_json(200, {"ok": True})
        self.send_json(404, {"error": "unknown mock endpoint"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--write-service-account", default=None, metavar="PATH")
    p.add_argument("--project", default="mock-project")
    p.add_argument("--api-key", default="mock-gemini-api-key")
    p.add_argument("--token-ttl", type=float, default=3599)
    p.add_argument("--exit-on-stdin-eof", action="store_true")
    args = p.parse_args(argv)
    state = State(args)
    Handler.state = state
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    state.token_uri = f"http://127.0.0.1:{port}/token"
    if args.write_service_account:
        write_service_account(state, args.write_service_account, args.project)
    print(f"listening 127.0.0.1:{port}", flush=True)
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
