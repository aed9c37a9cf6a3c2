"""The live server's OpenAPI document (admin-only, a request-body model for every route) and a
bounded schemathesis pass over it against a live app: no 5xx, and responses conform to the document
(status, content type, schema)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from proxy.api.openapi import NO_BODY
from proxy.api.schemas import MAX_BUDGET_EPSILON, MIN_BUDGET_EPSILON
from proxy.app import create_app
from tests.test_app_support import (  # noqa: F401 - fixtures
    ADMIN_KEY, CLIENT_KEY, LiveServer, admin_headers, assert_openai_error, fake_upstream, make_config,
)

schemathesis = pytest.importorskip("schemathesis")

#: Examples per operation and key: small on purpose, so the whole pass (every operation with the
#: admin key, then with a client key) stays well under two minutes on 2 busy cores.
EXAMPLES = {"admin": 6, "client": 3}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from proxy.devtools.fake_upstream import FakeUpstream

    tmp = tmp_path_factory.mktemp("openapi")
    with FakeUpstream() as fake:
        cfg = make_config(f"sqlite:///{tmp}/s.db", fake.base_url, None, client_tasks=["*"],
                          extra_server={"body_timeout": 10.0})
        with LiveServer(create_app(cfg)) as srv:
            doc = httpx.get(srv.url + "/admin/openapi.json", headers=admin_headers()).json()
            yield srv, doc


def test_openapi_is_admin_only(live: Any) -> None:
    srv, _ = live
    assert_openai_error(httpx.get(srv.url + "/admin/openapi.json"), 401)
    assert_openai_error(httpx.get(srv.url + "/admin/openapi.json",
                                  headers={"Authorization": f"Bearer {CLIENT_KEY}"}), 403)
    # The admin key only counts in the Authorization header (not x-api-key / api-key).
    for header in ("x-api-key", "api-key"):
        assert_openai_error(httpx.get(srv.url + "/admin/openapi.json", headers={header: ADMIN_KEY}), 401)
    # The scheme name is case-insensitive (RFC 7235), as docs/admin-api.md says.
    assert httpx.get(srv.url + "/admin/openapi.json", headers={"Authorization": f"bearer {ADMIN_KEY}"}).status_code == 200


def test_every_route_is_documented_with_its_body(live: Any) -> None:
    srv, doc = live
    app_routes = {(m, r.path) for r in srv.app.routes for m in getattr(r, "methods", ()) or ()
                  if m not in ("HEAD", "OPTIONS")}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert app_routes <= documented
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method in ("post", "put", "patch") and (method.upper(), path) not in NO_BODY:
                assert "requestBody" in op, (method, path)
            assert "default" in op["responses"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat == {"$ref": "#/components/schemas/ChatRequest"}
    budget = doc["components"]["schemas"]["BudgetUpdate"]["properties"]["epsilon"]
    assert budget["maximum"] == MAX_BUDGET_EPSILON and budget["minimum"] == MIN_BUDGET_EPSILON


def test_the_document_states_the_real_bounds_and_statuses(live: Any) -> None:
    _, doc = live
    paths = doc["paths"]
    # 201 (and 202) answers are documented with their JSON bodies, not left to the error schema.
    for path in ("/admin/jobs", "/admin/keys", "/admin/tasks", "/admin/datasets"):
        assert "201" in paths[path]["post"]["responses"], path
    assert {"200", "202"} <= set(paths["/admin/tasks/{name}/demos"]["post"]["responses"])
    # The bounds the server enforces are in the schema: the audit page size, the upload's budget.
    limit = next(p for p in paths["/admin/audit"]["get"]["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 1000)
    form = paths["/admin/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    epsilon = form["properties"]["epsilon"]
    assert (epsilon["minimum"], epsilon["maximum"]) == (MIN_BUDGET_EPSILON, MAX_BUDGET_EPSILON)


def test_schemathesis_pass_against_the_live_app(live: Any) -> None:
    """Every operation, with the admin key and with a client key: no 5xx, and every answer (status,
    content type, body) conforms to the document."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance, response_schema_conformance, status_code_conformance,
    )

    srv, doc = live
    schema = schemathesis.openapi.from_dict(doc)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures: list[str] = []
    operations = 0
    for who, headers in (("admin", admin_headers()), ("client", {"Authorization": f"Bearer {CLIENT_KEY}"})):
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1

            @settings(max_examples=EXAMPLES[who], deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def run(case: Any) -> None:
                case.call_and_validate(base_url=srv.url, headers=headers, checks=checks, timeout=30)

            try:
                run()
            except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report
                failures.append(f"{who}: {operation.method.upper()} {operation.path}: {str(exc)[:600]}")
    assert operations >= 40
    assert not failures, "\n\n".join(failures)
    # The pass really reached the server: count what the metrics recorded.
    metrics = httpx.get(srv.url + "/metrics", headers=admin_headers()).text
    served = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("dpicl_requests_total{"))
    assert served >= 2 * operations
