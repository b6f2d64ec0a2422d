"""Schedules pinned at the first, boundary and last epochs of a 100-epoch phase."""

import pytest

from seqgen.training.schedules import (
    learning_rate,
    linear_lr,
    teacher_forcing_ratio,
    warmup_cosine_lr,
)


def test_teacher_forcing_original_formula():
    assert teacher_forcing_ratio(0, 100, 0.7, 0.6) == pytest.approx(0.7)
    assert teacher_forcing_ratio(50, 100, 0.7, 0.6) == pytest.approx(0.65)
    assert teacher_forcing_ratio(99, 100, 0.7, 0.6) == pytest.approx(0.601)
    assert teacher_forcing_ratio(100, 100, 0.7, 0.6) == pytest.approx(0.6)
    assert teacher_forcing_ratio(150, 100, 0.3, 0.2) == pytest.approx(0.2)  # floored at end


def test_warmup_cosine_phase_one():
    lr = [warmup_cosine_lr(e, 100, 0.001, 0.0005) for e in range(100)]
    assert lr[0] == pytest.approx(0.0005)  # warm-up starts at min_lr
    assert lr[15] == pytest.approx(0.00075)  # halfway through the 30-epoch warm-up
    assert lr[30] == pytest.approx(0.001)  # warm-up ends at start_lr
    assert lr[99] == pytest.approx(0.0005)  # cosine ends at min_lr
    assert all(a < b for a, b in zip(lr[:30], lr[1:31], strict=True))
    assert all(a > b for a, b in zip(lr[30:99], lr[31:], strict=True))
    # cosine midpoint: progress 0.5 when (e - 30) / 69 = 0.5 -> lr halfway between the two
    assert warmup_cosine_lr(30 + 34.5, 100, 0.001, 0.0005) == pytest.approx(0.00075)


def test_linear_continued_phases():
    assert linear_lr(0, 100, 0.0005, 0.0001) == pytest.approx(0.0005)
    assert linear_lr(33, 100, 0.0005, 0.0001) == pytest.approx(0.0005 - 0.0004 / 3)
    assert linear_lr(99, 100, 0.0005, 0.0001) == pytest.approx(0.0001)
    assert learning_rate("linear", 99, 100, 0.00001, 0.000005) == pytest.approx(0.000005)


def test_short_phases_reach_both_ends():
    assert learning_rate("warmup_cosine", 0, 4, 0.001, 0.0005) == pytest.approx(0.0005)
    assert learning_rate("warmup_cosine", 1, 4, 0.001, 0.0005) == pytest.approx(0.001)
    assert learning_rate("warmup_cosine", 3, 4, 0.001, 0.0005) == pytest.approx(0.0005)
    assert learning_rate("linear", 0, 1, 0.001, 0.0005) == pytest.approx(0.001)


def test_warmup_linear_for_new_pure_autocorrelation_training():
    lr = [learning_rate("warmup_linear", e, 100, 0.001, 0.0005) for e in range(100)]
    assert lr[0] == pytest.approx(0.0005) and lr[15] == pytest.approx(0.00075)
    assert lr[30] == pytest.approx(0.001) and lr[99] == pytest.approx(0.0005)
    decay = [b - a for a, b in zip(lr[30:99], lr[31:], strict=True)]
    assert decay == pytest.approx([decay[0]] * 69) and decay[0] < 0  # a straight line down
