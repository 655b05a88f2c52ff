"""Cross entropy training a classifier: examples/iris_logistic_regression.py
against scikit-learn's LogisticRegression on the same objective."""

from __future__ import annotations

import numpy as np
import pytest
from test_cem import load_example

pytest.importorskip("sklearn")
pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def example():
    return load_example("iris_logistic_regression")


@pytest.mark.parametrize("C", [1.0, 0.05])
def test_log_loss_equals_sklearn_to_6_digits(example, C):
    out = example.compare(C)
    ours, sk = out["fastxent"], out["sklearn"]
    assert ours["log_loss"] == pytest.approx(sk["log_loss"], rel=1e-6)
    assert ours["objective"] == pytest.approx(sk["objective"], rel=1e-6)
    assert ours["accuracy"] == sk["accuracy"]
    # The training converged: the last objective is the smallest one seen.
    assert out["losses"][-1] == min(out["losses"])


def test_coefficients_match_sklearn(example):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    W, b, _ = example.fit(X, y, C=1.0)
    sk = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(X, y)
    np.testing.assert_allclose(W, sk.coef_.T, atol=1e-6)
    # The intercepts are unpenalised, so only their differences are identified.
    np.testing.assert_allclose(b - b.mean(), sk.intercept_ - sk.intercept_.mean(), atol=1e-6)


def test_main_prints_and_plots(example, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "loss.png"
    example.main(["--plot", str(png)])
    out = capsys.readouterr().out
    assert "iteration   1" in out and "sklearn LogisticRegression" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
