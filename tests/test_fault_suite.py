"""The fault-injection suite (benchmarks/fault_suite.py), reduced: one case per fault class that the tracer can
localise today, each must be the first local divergence with a hint naming its class; the controls stay clean."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fault_suite  # noqa: E402  (imports tracer before TensorFlow)

CASES = fault_suite.cases(per_class=1)


def test_every_checker_class_is_covered():
    from tracer.engine.diagnose import CLASSES

    named = {c.cls for _, c in CASES}
    assert set(CLASSES) - {"temperature"} <= named, set(CLASSES) - named


@pytest.mark.parametrize("group,case", CASES, ids=[f"{g}: {c.name}" for g, c in CASES])
def test_fault_is_localised_and_named(group, case):
    result = fault_suite.run_case(group, case)
    assert result.located, (result.row, result.hint)
    assert result.named, result.hint
