"""The fault-injection suite (benchmarks/fault_suite.py), reduced: one case per fault class that the tracer can
localise today, each must be the first local divergence with a hint naming its class; the controls stay clean."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fault_suite  # noqa: E402  (imports tracer before TensorFlow)

# bias=False changes the torch module's weight signature, so pairing does not pair it today: the suite reports it, this test skips it
KNOWN_GAPS = {"bias (bias=False)"}
CASES = [(g, c) for g, c in fault_suite.cases(per_class=1) if g not in KNOWN_GAPS]


def test_every_checker_class_is_covered():
    from tracer.engine.diagnose import CLASSES

    named = {c.cls for _, c in CASES}
    # `mapping` is a table's fault, not a port's: tests/test_bad_tables.py injects it through --mapping_file
    assert set(CLASSES) - {"temperature", "mapping"} <= named, set(CLASSES) - named


@pytest.mark.parametrize("group,case", CASES, ids=[f"{g}: {c.name}" for g, c in CASES])
def test_fault_is_localised_and_named(group, case):
    result = fault_suite.run_case(group, case)
    assert result.located, (result.row, result.hint)
    assert result.named, result.hint
