"""GET /openapi.json (runtime/openapi.py) in step with the app: every route documented and every
documented operation a route; real requests and answers validate against the documented schemas.
Also `dmf serve`'s machine defaults (workers, max batch, engine threads: runtime/server.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
jsonschema = pytest.importorskip("jsonschema")
from starlette.routing import Route, WebSocketRoute  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from conftest_runtime import predictor, rt  # noqa: E402,F401

from dmf.runtime import ServeOptions, create_app  # noqa: E402
from dmf.runtime.server import machine_defaults  # noqa: E402

VTT = b"WEBVTT\n\n00:00.000 --> 00:02.000\n<v Alice>i am so happy today\n\n00:02.500 --> 00:05.500\nBob: really?\n"


@pytest.fixture(scope="module")
def served(predictor):
    app = create_app(predictor, ServeOptions(max_wait_ms=2, max_upload_mb=4))
    with TestClient(app) as client:
        yield app, client, client.get("/openapi.json").json()


def _operation(doc: dict, method: str, path: str) -> dict:
    return doc["paths"][path][method.lower()]


def _check(doc: dict, method: str, path: str, response) -> None:
    """The answer's status and content type are documented for the operation, and a JSON body
    validates against the documented schema (JSON Schema 2020-12, as OpenAPI 3.1 uses)."""
    documented = _operation(doc, method, path)["responses"]
    assert str(response.status_code) in documented, (method, path, response.status_code)
    content = documented[str(response.status_code)]["content"]
    kind = response.headers["content-type"].split(";")[0]
    assert kind in content or "*/*" in content, (path, kind)
    if kind == "application/json":
        schema = {**content[kind]["schema"], "components": doc["components"]}
        jsonschema.Draft202012Validator(schema).validate(response.json())


def test_every_route_is_documented_and_every_operation_is_a_route(served):
    app, _, doc = served
    routes = {(m, r.path) for r in app.routes if isinstance(r, Route) for m in r.methods - {"HEAD"}}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    sockets = {r.path for r in app.routes if isinstance(r, WebSocketRoute)}
    assert sockets == set(doc["x-websockets"])  # not HTTP operations: described in an extension
    assert doc["openapi"].startswith("3.1")
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_documented_form_fields_are_the_ones_the_handlers_accept(rt, served):
    _, client, doc = served
    wav = rt.clips["good0.wav"].read_bytes()
    parts = {"audio": ("a.wav", wav, "audio/wav"), "text": (None, b"hello"), "transcript": ("t.vtt", VTT, "text/vtt"),
             "policy": (None, b"windows"), "extra": (None, b"x")}
    for path, audio in (("/v1/predict", "good0.wav"), ("/v1/conversation", "long6s.wav")):
        form = _operation(doc, "post", path)["requestBody"]["content"]["multipart/form-data"]["schema"]
        fields = {**{k: parts[k] for k in form["properties"]},
                  "audio": (audio, rt.clips[audio].read_bytes(), "audio/wav")}
        ok = client.post(path, files=fields)
        assert ok.status_code == 200, ok.text  # every documented field, accepted
        _check(doc, "POST", path, ok)
        unknown = client.post(path, files={**fields, "extra": parts["extra"]})
        assert unknown.status_code == 400 and "extra" in unknown.json()["error"]  # an undocumented one refused
        for name in form["required"]:
            missing = client.post(path, files={k: v for k, v in fields.items() if k != name})
            assert missing.status_code == 400, name
            _check(doc, "POST", path, missing)
        optional = set(form["properties"]) - set(form["required"])
        if optional:
            rest = client.post(path, files={k: v for k, v in fields.items() if k not in optional})
            assert rest.status_code == 200


def test_answers_validate_against_the_document(rt, served, predictor):
    _, client, doc = served
    predict = client.post("/v1/predict", files={"audio": ("a.wav", rt.clips["good1.wav"].read_bytes(), "audio/wav"),
                                                "text": (None, b"hello")})
    assert set(predict.json()["probabilities"]) == set(predictor.labels)
    answers = [
        ("POST", "/v1/predict", predict),
        ("POST", "/v1/predict", client.post("/v1/predict", files={"audio": ("n.wav", rt.clips["nan.wav"].read_bytes()),
                                                                   "text": (None, b"hi")})),
        ("POST", "/v1/predict", client.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"})),
        ("GET", "/healthz", client.get("/healthz")),
        ("GET", "/metrics", client.get("/metrics")),
        ("GET", "/metrics", client.get("/metrics?format=prometheus")),
        ("GET", "/metrics", client.get("/metrics?format=xml")),
        ("GET", "/openapi.json", client.get("/openapi.json")),
        ("GET", "/live", client.get("/live")),
        ("GET", "/live/{name}", client.get("/live/no-such-file.js")),
    ]
    assert [r.status_code for _, _, r in answers] == [200, 422, 415, 200, 200, 200, 400, 200, 200, 404]
    for method, path, response in answers:
        _check(doc, method, path, response)


# ------------------------------------------------------------------------------ serve defaults

CPU = {"running_engine": "onnx", "providers": ["CPUExecutionProvider"]}


def test_machine_defaults_follow_the_cores_and_the_device(predictor):
    assert machine_defaults(CPU, cores=2) == (2, 2) and machine_defaults(CPU, cores=16) == (16, 2)
    assert machine_defaults({"running_engine": "openvino", "providers": ["CPU (f32)"]}, cores=1) == (1, 2)
    assert machine_defaults({"running_engine": "onnx", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
                            cores=16) == (1, 8)
    assert ServeOptions(workers=3, max_batch=5).resolved(CPU, cores=2) == ServeOptions(workers=3, max_batch=5)
    from dmf.cpuinfo import cpu_info

    app = create_app(predictor)  # the Python API takes the same defaults
    try:
        assert (app.state.options.workers, app.state.options.max_batch) == (cpu_info().cores, 2)
        assert app.state.batcher.workers == cpu_info().cores
    finally:
        app.state.batcher.close()


def test_dmf_serve_loads_one_engine_thread_per_worker(monkeypatch, rt):
    """`dmf serve` without --threads: one engine thread per worker when it runs several (the
    default); the engine's own threads with --workers 1."""
    from typer.testing import CliRunner

    import dmf.runtime.cli as runtime_cli
    import dmf.runtime.server as server
    from dmf.cli import app

    seen = []
    monkeypatch.setattr(runtime_cli, "_load_predictor", lambda *a: seen.append(a[3]) or _Closable())
    monkeypatch.setattr(server, "serve", lambda predictor, options, **kw: seen.append(options))
    for extra, threads in (([], 1), (["--workers", "1"], None), (["--threads", "3"], 3)):
        result = CliRunner().invoke(app, ["serve", str(rt.artifact), *extra])
        assert result.exit_code == 0, result.output
        assert seen[-2] == threads
    assert seen[1].workers is None and seen[1].max_batch is None  # resolved by create_app for the engine


class _Closable:
    def close(self) -> None:
        pass
