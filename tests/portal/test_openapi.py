"""The API against its own OpenAPI document, with schemathesis: generated requests (random
namespaces, queue ids, filters, bodies) get documented status codes and bodies that match the
schemas, and never a server error."""

from __future__ import annotations

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from .conftest import RunningPortal


def test_openapi_document_is_served_and_valid(portal: RunningPortal) -> None:
    doc = requests.get(portal.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.0")
    routes = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert ("GET", "/api/v1/namespaces/{ns}/logs") in routes
    assert ("DELETE", "/api/v1/namespaces/{ns}/suppression/{address}") in routes


def test_api_conforms_to_its_document(portal: RunningPortal) -> None:
    schema = schemathesis.from_uri(
        portal.url + "/openapi.json", base_url=portal.url,
        generation_config=schemathesis.GenerationConfig(with_security_parameters=False))
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            # alice's token: random namespaces are refused, "shop" is hers
            response = case.call(headers={"Authorization": "Bearer alice-token"})
            case.validate_response(response, checks=(
                checks.not_a_server_error, checks.status_code_conformance,
                checks.content_type_conformance, checks.response_schema_conformance))

        check()
        checked += 1
    assert checked == 13
