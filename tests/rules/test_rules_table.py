"""What is not about one family of rules: the error an op without a rule raises, and that every rule of the table
lives in one of the seven family modules, so that none escapes their coverage tests (test_rules_<family>.py)."""
import pytest
from onnx import helper
from support.rule_cases import Case, randn

from igcam_engine.errors import UserError
from igcam_engine.export.autodiff import vjp_model
from igcam_engine.export.rules import RULES, elementwise, layout, normalization, products, reductions, resampling, windows

FAMILIES = (elementwise, layout, normalization, products, reductions, resampling, windows)


def test_unsupported_op_is_named():
    node = helper.make_node("Hardmax", ["x"], ["Y"], name="my_hardmax")
    case = Case("unsupported", [node], {"x": randn(2, 3)}, None)
    with pytest.raises(UserError, match=r"Hardmax \(node 'my_hardmax'\).*rules exist for: .*Conv"):
        vjp_model(case.model(), "x", "Y")


def test_every_rule_is_defined_in_a_family_module():
    """A rule defined elsewhere (helpers.py, table.py, a new module) would have no family test checking its case."""
    families = {family.__name__ for family in FAMILIES}
    elsewhere = sorted(f"{op} ({fn.__module__})" for op, fn in RULES.items() if fn.__module__ not in families)
    names = ", ".join(sorted(family.__name__.rsplit(".", 1)[1] for family in FAMILIES))
    assert not elsewhere, f"rules defined outside the family modules ({names}) have no coverage test: {elsewhere}"
