"""Property-based checks of /openapi.json against the app itself (schemathesis, short run).

Every operation gets a few generated requests, valid and invalid; the answers must
never be a 5xx and must match the statuses, content types and schemas the OpenAPI
document declares. Not checked: that schema-valid data is accepted: a random
"binary" body is valid per the schema and still no image (422, by design).
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tagmill.serve import ServeConfig, create_app


# SageMaker's image type goes on the wire like any binary body
schemathesis.serializer.alias("application/x-image", "application/octet-stream")


@pytest.fixture(scope="module")
def api(bundle: str) -> Any:
    app = create_app(ServeConfig(bundle=bundle, max_body_mb=1))
    service = app.state.service
    service.start()  # schemathesis runs the lifespan too; start() is idempotent
    assert service.batcher.wait_ready(60) and service.ready
    return schemathesis.openapi.from_asgi("/openapi.json", app)


#: every operation in /openapi.json; the first test fails when a route is added without a check
OPERATIONS = [
    ("GET", "/ping"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/model"),
    ("POST", "/invocations"),
    ("POST", "/endpoints/{name}/invocations"),
    ("POST", "/predict"),
    ("POST", "/admin/model"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/ready"),
    ("POST", "/v2/models/{name}/infer"),
    ("GET", "/v2/models/{name}/versions/{version}"),
    ("GET", "/v2/models/{name}/versions/{version}/ready"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
]


def test_every_operation_is_checked(api: Any) -> None:
    found = {(result.ok().method.upper(), result.ok().path) for result in api.get_all_operations()}
    assert found == set(OPERATIONS)


# schemathesis's own pytest loaders (parametrize / from_fixture) do not run under
# pytest 9 yet (they set a private node id), so each operation's strategy is driven
# with Hypothesis directly.
#: operations with inputs, so invalid ones can be generated too (a string path parameter
#: has no invalid value: GETs are generated valid only)
WITH_INPUT = [op for op in OPERATIONS if op[0] == "POST"]
CASES = [(*op, GenerationMode.POSITIVE) for op in OPERATIONS] + [(*op, GenerationMode.NEGATIVE) for op in WITH_INPUT]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_operation_conforms_to_openapi(api: Any, method: str, path: str, mode: GenerationMode) -> None:
    operation = api[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def check(case: Any) -> None:
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    check()
