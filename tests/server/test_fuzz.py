"""Every route fuzzed from the OpenAPI schema (schemathesis) against a real server on loopback: no 5xx, and
statuses, content types and bodies as the schema declares them. A bounded number of cases per route."""
from __future__ import annotations

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from benchmarks.loopback import ServerProcess

EXAMPLES = 40  # per operation and mode (positive, negative)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    server = ServerProcess(tiny_model_dir, root / "store", root / "cache",
                           extra_args=["--max-dataset-rows", "4", "--max-new-tokens-limit", "64"]).wait_ready()
    yield server
    server.stop()


def test_every_route_conforms_to_its_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert "POST /v1/generate" in labels and "POST /v1/tasks" in labels and len(labels) >= 14, labels
    ran = {}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for op in operations:
            count = [0]

            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None)
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                count[0] += 1
                case.call_and_validate(checks=CHECKS, timeout=60)
            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (a route without parameters or body)
                assert mode is GenerationMode.NEGATIVE and count[0] == 0, op.label
            ran[f"{mode.value} {op.label}"] = count[0]
    print("fuzz cases per route:", ran, "total:", sum(ran.values()))
    assert sum(ran.values()) > 200
