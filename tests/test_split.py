import pytest

from offsite.emulator.plan import SplitPlan, make_plan, uniform_indices
from offsite.errors import OffsiteError


def test_uniform_indices_follow_the_paper_rule():
    # round(i*(n-1)/(K-1)): first and last middle block always kept
    assert uniform_indices(26, 13) == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23, 25]
    assert uniform_indices(10, 1) == [0]
    assert uniform_indices(5, 5) == [0, 1, 2, 3, 4]
    assert uniform_indices(26, 23)[0] == 0 and uniform_indices(26, 23)[-1] == 25


def test_default_plan_is_2_plus_2_adapter_and_half_the_middle():
    plan = make_plan(30)
    assert plan.adapter == (0, 1, 28, 29)
    assert len(plan.kept) == 13 and plan.kept[0] == 2 and plan.kept[-1] == 27
    assert set(plan.kept) | set(plan.dropped) == set(range(2, 28))
    assert plan.emulator_order == tuple(sorted(plan.adapter + plan.kept))


def test_drop_ratio_and_explicit_blocks():
    assert len(make_plan(30, drop_ratio=0.5).kept) == 13
    plan = make_plan(12, adapter_blocks=(0, 11), kept_blocks=(3, 5))
    assert plan.adapter == (0, 11) and plan.kept == (3, 5) and plan.strategy == "explicit"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"emulator_layers": 27}, "middle has 26 blocks"),
        ({"emulator_layers": 0}, "choose 1..26"),
        ({"adapter_bottom": 15, "adapter_top": 15}, "leaves no middle"),
        ({"adapter_blocks": (0, 30)}, "out of range"),
        ({"adapter_blocks": (0, 1), "kept_blocks": (1, 2)}, "must not overlap"),
        ({"drop_ratio": 1.0}, "must be in [0, 1)"),
        ({"emulator_layers": 3, "drop_ratio": 0.5}, "at most one"),
    ],
)
def test_invalid_splits_are_clear_errors(kwargs, message):
    with pytest.raises(OffsiteError, match=message.replace("[", r"\[").replace(")", r"\)")):
        make_plan(30, **kwargs)


def test_plan_rejects_duplicates():
    with pytest.raises(OffsiteError, match="duplicates"):
        SplitPlan(10, (0, 0), (2,))
