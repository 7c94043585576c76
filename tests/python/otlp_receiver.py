"""An OTLP/HTTP trace receiver for the gateway's tracing tests: `POST /v1/traces` with an
`ExportTraceServiceRequest` in protobuf (`Content-Type: application/x-protobuf`, gzip or not),
parsed with the official `opentelemetry-proto` package, answered with an empty
`ExportTraceServiceResponse` as the OTLP spec says (opentelemetry.io/docs/specs/otlp/#otlphttp).

    python otlp_receiver.py [--port N] [--status N] [--exit-on-stdin-eof]

Prints exactly one line `listening 127.0.0.1:<port>` on stdout, then serves until killed.

- `GET /_mock/spans`: every span received, as JSON: `{trace_id, span_id, parent_span_id
  (hex, "" for none), name, kind (SPAN_KIND_SERVER ...), status_code (STATUS_CODE_ERROR ...),
  start_ns, end_ns, attributes: {key: value} (arrays as lists), resource: {key: value},
  scope}`.
- `GET /_mock/stats`: `{requests, spans, refused}`.
- `--status N` (or `POST /_mock/status/N`): answer exports with N (e.g. 503) and keep nothing.
"""

import argparse
import gzip
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

LOCK = threading.Lock()
SPANS = []
STATS = {"requests": 0, "spans": 0, "refused": 0}
STATUS = [200]


def value_of(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value_of(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def attrs(kvs):
    return {kv.key: value_of(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with LOCK:
            if self.path == "/_mock/spans":
                body = json.dumps(SPANS).encode()
            elif self.path == "/_mock/stats":
                body = json.dumps(STATS).encode()
            else:
                return self.reply(404, b"not found\n", "text/plain")
        self.reply(200, body, "application/json")

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n)
        if self.path.startswith("/_mock/status/"):
            STATUS[0] = int(self.path.rsplit("/", 1)[1])
            return self.reply(200, b"{}", "application/json")
        if self.path != "/v1/traces":
            return self.reply(404, b"not found\n", "text/plain")
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-protobuf":
            return self.reply(415, b"protobuf only\n", "text/plain")
        with LOCK:
            STATS["requests"] += 1
            if STATUS[0] != 200:
                STATS["refused"] += 1
                return self.reply(STATUS[0], b"", "application/x-protobuf")
        req = ExportTraceServiceRequest()
        req.ParseFromString(raw)
        got = []
        for rs in req.resource_spans:
            resource = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append({
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": Span.SpanKind.Name(s.kind),
                        "status_code": Status.StatusCode.Name(s.status.code),
                        "start_ns": s.start_time_unix_nano,
                        "end_ns": s.end_time_unix_nano,
                        "attributes": attrs(s.attributes),
                        "resource": resource,
                        "scope": ss.scope.name,
                    })
        with LOCK:
            SPANS.extend(got)
            STATS["spans"] += len(got)
        self.reply(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--exit-on-stdin-eof", action="store_true")
    args = p.parse_args(argv)
    STATUS[0] = args.status
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
