"""The attention-SVM solver against brute-force checks on tiny problems, and the GD tracker."""

import numpy as np
import torch

from hf_multimax.analysis.max_margin import att_svm_batch, correlation, make_problem, track_gradient_descent


def margins(problem, W, s):
    X, z, opt = problem.X[s], problem.z[s], problem.opt[s]
    n, T, _ = X.shape
    return torch.tensor([float((X[i, t] - X[i, opt[i]]) @ W @ z[i]) for i in range(n) for t in range(T) if t != opt[i]])


def test_svm_constraints_hold_with_equality_on_support_vectors():
    problem = make_problem(seeds=4, n=3, T=4, d=5, seed=1)
    W_mm = att_svm_batch(problem)
    for s in range(4):
        m = margins(problem, W_mm[s], s)
        assert m.max() <= -1 + 1e-8  # every constraint holds
        assert (m > -1 - 1e-6).sum() >= 1  # and some are tight (support vectors)


def test_svm_norm_is_minimal_among_feasible_points():
    problem = make_problem(seeds=1, n=3, T=4, d=5, seed=2)
    W_mm = att_svm_batch(problem)[0]
    rng = np.random.default_rng(0)
    for _ in range(200):
        # Random feasible point: a random direction scaled until it satisfies every margin.
        W = torch.from_numpy(rng.standard_normal((5, 5))) + W_mm
        worst = margins(problem, W, 0).max()
        if worst < 0:
            W = W / (-worst)  # now the tightest constraint sits at -1
            assert W.norm() >= W_mm.norm() - 1e-9


def test_gradient_descent_direction_approaches_the_svm():
    problem = make_problem(seeds=6, seed=0)
    result = track_gradient_descent(problem, steps=300, record=[10, 100, 300])
    means = [result["corr"][k].mean().item() for k in (10, 100, 300)]
    assert means[0] < means[1] < means[2] and means[2] > 0.85
    assert torch.allclose(correlation(result["W_mm"], result["W_mm"]), torch.ones(6, dtype=torch.float64))
