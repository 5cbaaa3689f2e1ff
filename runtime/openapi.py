"""The OpenAPI 3.1 document of `dmf serve`'s HTTP API, served at GET /openapi.json.

Written here as data, not parsed from handler docstrings (starlette's SchemaGenerator reads YAML
from docstrings, which would add PyYAML to the server and describe no schemas of its own). The
document is filled per server: the label enum and the probability keys are the artifact's
dmf.json labels, the upload limit and policy values the server's. tests/test_openapi.py keeps it
in step with the app: every route is documented and every documented path is a route, and real
requests and answers validate against the schemas. The WebSocket /v1/stream is not an HTTP
operation: it is described under the `x-websockets` extension (protocol in docs/stream.md).
Torch-free, no imports beyond the standard library.
"""

from __future__ import annotations

from typing import Any, Sequence

ERROR = {"$ref": "#/components/schemas/Error"}
# statuses every POST may answer besides 200 (docs/serving.md, "HTTP server")
POST_ERRORS = {
    "400": "bad audio or text, missing or unknown field, malformed multipart body",
    "408": "body not received within the request timeout",
    "413": "upload over the size limit",
    "415": "not multipart/form-data",
    "422": "NaN / Inf / out-of-range samples, or non-finite scores",
    "431": "request line and headers over 16 KiB",
    "500": "engine failure (the detail is in the server log)",
    "503": "busy (max_queue requests in progress), no result within the timeout, or shutting down",
}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(codes: dict[str, str]) -> dict:
    return {code: _json(ERROR, why) for code, why in codes.items()}


def _obj(properties: dict, required: Sequence[str] | None = None, extra: bool = False) -> dict:
    """A JSON object schema; `required` defaults to every property; `extra`: other keys allowed."""
    return {"type": "object", "properties": properties,
            "required": list(properties if required is None else required), "additionalProperties": extra}


def _schemas(labels: Sequence[str]) -> dict[str, Any]:
    label = {"type": "string", "enum": list(labels), "description": "the arg-max label (dmf.json labels)"}
    probs = _obj({lab: {"type": "number", "minimum": 0, "maximum": 1} for lab in labels})
    number_or_null = {"type": ["number", "null"]}
    return {
        "Error": _obj({"error": {"type": "string", "description": "one line, safe to show"}}),
        "Prediction": _obj({"label": label, "label_name": {"type": "string", "description": "the label's full name"},
                            "probabilities": probs, "truncated": {
            "type": "boolean", "description": "the clip was longer than the model's window; its first window was scored"},
            "top_k": {"type": "array", "description": "with ?top_k=K: the K most probable labels, most probable first",
                      "items": _obj({"label": label, "name": {"type": "string"},
                                     "probability": {"type": "number", "minimum": 0, "maximum": 1}})}},
            required=["label", "label_name", "probabilities", "truncated"]),
        "Turn": _obj({"start": {"type": "number"}, "end": {"type": "number"}, "speaker": {"type": ["string", "null"]},
                      "text": {"type": "string"}, "label": label, "probabilities": probs,
                      "truncated": {"type": "boolean"}, "windows": {"type": "integer", "minimum": 1}}),
        "Conversation": _obj({
            "policy": {"type": "string", "enum": ["first", "windows"]},
            "turns": {"type": "array", "items": {"$ref": "#/components/schemas/Turn"}},
            "summary": {"type": "object", "description": "speaker ('?' when unknown) -> label -> share of its turns",
                        "additionalProperties": probs},
            "warnings": {"type": "array", "items": {"type": "string"}}}),
        "Health": _obj({
            "status": {"const": "ok"}, "path": {"type": "string", "description": "the artifact's folder name"},
            "engine": {"type": "string"}, "precision": {"type": "string"}, "fusion": {"type": ["string", "null"]},
            "labels": {"type": "array", "items": {"type": "string"}},
            "label_names": {"type": "array", "items": {"type": "string"}}, "sample_rate": {"type": "integer"},
            "input_samples": {"type": "integer"}, "max_tokens": {"type": "integer"}, "max_batch": {"type": "integer"},
            "dmf_version": {"type": ["string", "null"]}, "running_engine": {"type": "string"},
            "providers": {"type": "array", "items": {"type": "string"}}}),
        "Metrics": _obj({
            "uptime_s": {"type": "number"}, "requests_total": {"type": "integer"},
            "requests_by_status": {"type": "object", "additionalProperties": {"type": "integer"}},
            "in_flight": {"type": "integer"},
            "latency_ms": _obj({"count": {"type": "integer"}, "p50": number_or_null, "p99": number_or_null}),
            "queue_depth": {"type": "integer"},
            "batcher": {"type": "object", "description": "batches, batch-size histogram, rejected"},
            "streams": {"type": "object", "description": "/v1/stream: open streams, closes by code"},
            "options": {"type": "object", "description": "the server's limits (ServeOptions)"}}),
    }


def _multipart(fields: dict, required: Sequence[str]) -> dict:
    return {"required": True, "content": {"multipart/form-data": {"schema": _obj(fields, required)}}}


def _paths(max_upload_mb: float) -> dict[str, Any]:
    upload = f"the request body is at most {max_upload_mb:g} MiB"
    audio = {"type": "string", "contentMediaType": "application/octet-stream",
             "description": "an audio file (anything libsndfile reads: WAV, FLAC, OGG, ...)"}
    return {
        "/v1/predict": {"post": {
            "summary": "The emotion of one clip and its transcript", "operationId": "predict",
            "description": f"multipart/form-data; {upload}.",
            "parameters": [{"name": "top_k", "in": "query", "required": False,
                            "description": "also answer the K most probable labels (1..number of labels)",
                            "schema": {"type": "integer", "minimum": 1}}],
            "requestBody": _multipart({"audio": audio, "text": {"type": "string", "description": "UTF-8 transcript"}},
                                      ["audio", "text"]),
            "responses": {"200": _json({"$ref": "#/components/schemas/Prediction"}, "the prediction"),
                          **_errors(POST_ERRORS)}}},
        "/v1/conversation": {"post": {
            "summary": "One prediction per segment of a recording's time-stamped transcript",
            "operationId": "conversation", "description": f"multipart/form-data; {upload}.",
            "requestBody": _multipart({
                "audio": {**audio, "description": "the recording"},
                "transcript": {"type": "string", "contentMediaType": "application/octet-stream",
                               "description": "a .vtt, .srt or .json file; its file name's suffix decides"},
                "policy": {"type": "string", "enum": ["first", "windows"], "default": "first",
                           "description": "segments longer than the model's window: first window, or all averaged"}},
                ["audio", "transcript"]),
            "responses": {"200": _json({"$ref": "#/components/schemas/Conversation"}, "turns, per-speaker summary, warnings"),
                          **_errors({**POST_ERRORS, "413": "upload over the size limit, or more segments than max_segments"})}}},
        "/healthz": {"get": {
            "summary": "Liveness and the artifact served", "operationId": "health",
            "responses": {"200": _json({"$ref": "#/components/schemas/Health"}, "serving"),
                          **_errors({"503": "shutting down"})}}},
        "/metrics": {"get": {
            "summary": "Request, batch and latency counters", "operationId": "metrics",
            "parameters": [{"name": "format", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["json", "prometheus"], "default": "json"}}],
            "responses": {"200": {"description": "JSON, or Prometheus text exposition with format=prometheus",
                                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Metrics"}},
                                              "text/plain": {"schema": {"type": "string"}}}},
                          **_errors({"400": "unknown format"})}}},
        "/openapi.json": {"get": {
            "summary": "This document", "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        "/live": {"get": {
            "summary": "The live page: microphone to /v1/stream in a browser", "operationId": "live_page",
            "responses": {"200": {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/live/{name}": {"get": {
            "summary": "The live page's scripts and style", "operationId": "live_file",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the file", "content": {"*/*": {"schema": {"type": "string"}}}},
                          **_errors({"404": "not one of the page's files"})}}},
    }


WEBSOCKETS = {
    "/v1/stream": {"description": "WebSocket (not an HTTP operation): a live audio stream in PCM frames, "
                                  "scored utterance by utterance through the server's batcher; the protocol and "
                                  "close codes are in docs/stream.md."},
}


def document(labels: Sequence[str], max_upload_mb: float, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server of `labels` (dmf.json) and upload limit."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "dmf serve", "version": version,
                 "description": "Speech emotion recognition from a clip and its transcript (Dual Memory Fusion). "
                                "Errors are JSON {\"error\": \"...\"}."},
        "paths": _paths(max_upload_mb),
        "components": {"schemas": _schemas(labels)},
        "x-websockets": WEBSOCKETS,
    }
