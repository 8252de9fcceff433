"""Property-based API testing with schemathesis against the running gateway's ``/openapi.json``.

For every operation, positive and negative cases (a bounded number each): no answer is a 5xx,
every status code is documented, every body matches its documented schema and content type.
The gateway cannot tell a made-up token from a forged one, so most payment requests end in a
``token_*`` 401 or a ``request_invalid`` 400: what this checks is that each is documented and
shaped as the contract says. ``GET /v1/payments/{id}`` also runs with a real API key, so that
its 200/404 side is reached.

The schema is loaded from the live server with ``schemathesis.openapi.from_url`` and each
operation's Hypothesis strategy is driven with ``@given``. (``schemathesis.pytest.from_fixture``
with ``@schema.parametrize()``, the usual way for a schema that only exists once a fixture ran,
fails under pytest 9 in schemathesis 4.32.5: it sets ``request.node._nodeid``, which pytest 9
no longer has.)
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.gateway.conftest import Gateway

MAX_EXAMPLES = 50
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
OPERATIONS = [
    ("POST", "/v1/payments"),
    ("GET", "/v1/payments/{payment_id}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def api_schema(gateway: Gateway) -> OpenApiSchema:
    cacert = str(gateway.home.cacert)
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json", verify=cacert,
                                           timeout=10)
    schema.config.update(base_url=gateway.url, tls_verify=cacert, request_timeout=10)
    return schema


def test_schema_documents_every_operation(api_schema: OpenApiSchema) -> None:
    results = list(api_schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results)  # no invalid operation
    found = {(r.ok().method.upper(), r.ok().path) for r in results if isinstance(r, Ok)}
    assert found == set(OPERATIONS)


CASES = [
    *((method, path, False, GenerationMode.POSITIVE) for method, path in OPERATIONS),
    ("GET", "/v1/payments/{payment_id}", True, GenerationMode.POSITIVE),
    # Only the payment request has inputs whose negation can reach the server (the others
    # take no parameters, or only a path segment and a header that any string satisfies).
    ("POST", "/v1/payments", False, GenerationMode.NEGATIVE),
]


@pytest.mark.parametrize(("method", "path", "with_api_key", "mode"), CASES,
                         ids=[f"{m}-{p}-{'api-key-' if k else ''}{g.value}"
                              for m, p, k, g in CASES])
def test_operation_conforms_to_the_schema(api_schema: OpenApiSchema, gateway: Gateway,
                                          method: str, path: str, with_api_key: bool,
                                          mode: GenerationMode) -> None:
    operation = api_schema[path][method]
    headers = {"Authorization": f"Bearer {gateway.api_key()}"} if with_api_key else None
    cacert = str(gateway.home.cacert)

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode, headers=headers))
    def check(case: Case[Any]) -> None:
        case.call_and_validate(checks=CHECKS, verify=cacert, timeout=10)

    check()
