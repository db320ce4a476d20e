"""schemathesis against the OpenAPI schema the server publishes: no 5xx, and every answer conforms to the
schema (documented status codes, content types and bodies). Bounded so it stays under ~2 minutes on 2 cores.

`positive_data_acceptance` is off: a schema-valid request can still be refused for reasons a schema cannot
state (prompt longer than the model's context, a token id outside the vocabulary, an unknown model name).
"""

from __future__ import annotations

import pytest

from tests.server_fixtures import serve

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def server(tiny_bge_m3):
    with serve([str(tiny_bge_m3), "--max-request-body-bytes", "256k"]) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url("/openapi.json"))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_schema(case, server):
    case.call_and_validate(base_url=server.base_url, timeout=60, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
        negative_data_rejection])
