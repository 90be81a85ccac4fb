"""Gao et al. 2022 scaling-law fits of gold reward against d = sqrt(KL): hand-made points, known coefficients."""

import math

import pytest
import torch

from pipeline.algo import gao_curve, gao_fit


def test_best_of_n_form_recovers_exact_coefficients():
    # R(d) = d (1.5 - 0.5 d): at d = 1, 2, 3 the gains are 1.0, 1.0, 0.0
    d = torch.tensor([1.0, 2.0, 3.0])
    fit = gao_fit(d, torch.tensor([1.0, 1.0, 0.0]), "best_of_n")
    assert fit.alpha == pytest.approx(1.5) and fit.beta == pytest.approx(0.5) and fit.r2 == pytest.approx(1.0)
    assert gao_curve(fit, torch.tensor([0.0, 1.5])).tolist() == pytest.approx([0.0, 1.125])  # 1.5 (1.5 - 0.75)


def test_rl_form_recovers_exact_coefficients_and_takes_d_zero():
    # R(d) = d (0.4 - 0.2 log d): d = 0 -> 0; d = 1 -> 0.4; d = e -> e (0.4 - 0.2) = 0.2 e
    d = torch.tensor([0.0, 1.0, math.e])
    fit = gao_fit(d, torch.tensor([0.0, 0.4, 0.2 * math.e]), "rl")
    assert fit.alpha == pytest.approx(0.4) and fit.beta == pytest.approx(0.2) and fit.r2 == pytest.approx(1.0)


def test_r2_of_a_poor_fit_is_below_one():
    # gains 0, 1, 0, 1 at d = 1..4 zig-zag: no curve of the form follows them
    fit = gao_fit(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 1.0, 0.0, 1.0]), "best_of_n")
    assert fit.r2 < 0.5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="form"):
        gao_fit(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), "linear")
    with pytest.raises(ValueError, match="two or more"):
        gao_fit(torch.tensor([1.0]), torch.tensor([1.0]), "rl")
