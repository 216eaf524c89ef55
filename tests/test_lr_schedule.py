"""Learning-rate schedules: warm-up then cosine (MixMIM Table 11) or steps (SimMIM section 4.3,
appendix B), selected by optim.schedule."""

import pytest

from mixmim.config import ConfigError, load_config
from mixmim.training.schedule import lr_at


def test_step_schedule_holds_the_peak_for_seven_eighths_then_divides_by_ten():
    """SimMIM section 4.3: 4e-4 for 7/8 of the run (after the linear warm-up), 4e-5 after."""
    total, warmup = 800, 10
    lrs = [lr_at(s, total, warmup, 4e-4, schedule="step", step_fractions=[0.875], step_gamma=0.1)
           for s in range(total)]
    assert lrs[:warmup] == pytest.approx([4e-4 * (s + 1) / warmup for s in range(warmup)])
    assert lrs[warmup:700] == pytest.approx([4e-4] * (700 - warmup))
    assert lrs[700:] == pytest.approx([4e-5] * 100)


def test_step_schedule_with_two_milestones_of_appendix_b():
    lrs = [lr_at(s, 100, 10, 8e-4, schedule="step", step_fractions=[0.9, 0.95]) for s in range(100)]
    assert lrs[89] == pytest.approx(8e-4) and lrs[90] == pytest.approx(8e-5) and lrs[95] == pytest.approx(8e-6)


def test_cosine_is_unchanged_and_the_default():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert lr_at(99, 100, 0, 1.0, schedule="cosine") < 1e-3


def test_bad_schedules_are_clear_errors():
    with pytest.raises(ValueError, match="optim.schedule='linear'"):
        lr_at(0, 10, 0, 1.0, schedule="linear")
    with pytest.raises(ValueError, match="step_fractions"):
        lr_at(0, 10, 2, 1.0, schedule="step", step_fractions=[0.9, 0.5])
    with pytest.raises(ValueError, match="step_gamma"):
        lr_at(0, 10, 0, 1.0, schedule="step", step_gamma=2.0)
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(None, ["optim.schedule=linear"])


def test_any_method_can_choose_the_step_schedule():
    cfg = load_config(None, ["method.name=mixmim", "optim.schedule=step", "optim.step_fractions=[0.9, 0.95]"])
    assert (cfg.optim.schedule, cfg.optim.step_fractions, cfg.optim.step_gamma) == ("step", [0.9, 0.95], 0.1)
    assert load_config(None, []).optim.schedule == "cosine"
