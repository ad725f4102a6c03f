"""The suite's own layout on pytest-xdist workers (tests/conftest.py)."""

import importlib

from tests.conftest import SERVICE_TESTS, SERVICES, xdist_work_unit


def test_every_service_test_names_a_test_that_exists():
    """A renamed Ray or Chromium test would otherwise silently leave the SERVICES work unit."""
    for entry in SERVICE_TESTS:
        path, _, name = entry.partition("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        if name:
            assert callable(getattr(module, name.partition("[")[0], None)), f"{entry} names no test"


def test_work_units_are_modules_except_the_service_tests():
    assert xdist_work_unit("tests/test_pipeline.py::test_tiny_preset_with_embedded_ray") == SERVICES
    assert xdist_work_unit("tests/test_batch_attribution.py::test_kill_mid_batch") == SERVICES
    assert xdist_work_unit("tests/test_pipeline_guards.py::test_stage_exception_is_one_error_line[ray]") == SERVICES
    local = "tests/test_pipeline_guards.py::test_stage_exception_is_one_error_line[local]"
    assert xdist_work_unit(local) == "tests/test_pipeline_guards.py"
