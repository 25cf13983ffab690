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
    # `mapping` is a table's fault, not a port's: tests/test_bad_tables.py injects it through --mapping_file
    assert set(CLASSES) - {"temperature", "mapping"} <= named, set(CLASSES) - named


@pytest.mark.parametrize("group,case", CASES, ids=[f"{g}: {c.name}" for g, c in CASES])
def test_fault_is_localised_and_named(group, case):
    result = fault_suite.run_case(group, case)
    assert result.located, (result.row, result.hint)
    assert result.named, result.hint


def test_a_gelu_variant_under_the_local_tolerance_is_named():
    """transformers' BertIntermediate with gelu_new for Keras' erf GELU: on demo-scale pre-activations the layer's
    local error stays under the tolerance, yet the activation check names both functions and the row diverges."""
    from tracer.engine.compare import LOCAL_REL_L2

    group, case = next((g, c) for g, c in fault_suite.cases(per_class=5) if c.name.startswith("bert: layer 1 intermediate gelu_new"))
    result = fault_suite.run_case(group, case)
    assert result.located and result.named, (result.row, result.hint)
    assert "gelu_new" in result.hint and "gelu (erf)" in result.hint
    assert result.verdict == "diverged"
    local = float(result.hint.rsplit("differ by rel_l2 ", 1)[1])
    assert local < LOCAL_REL_L2  # the case this test is for: a fault the tolerance alone would miss
