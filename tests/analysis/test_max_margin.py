"""The attention-SVM solver against brute-force checks on tiny problems, and the GD tracker."""

import numpy as np
import torch

from hf_multimax.analysis.max_margin import (
    _gradient,
    att_svm_batch,
    correlation,
    make_problem,
    track_gradient_descent,
)


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


def test_closed_form_gradient_matches_autograd():
    problem = make_problem(seeds=3, seed=5)
    W = torch.randn(3, 10, 10, dtype=torch.float64, requires_grad=True)
    scores = torch.einsum("sntd,sde,sne->snt", problem.X, W, problem.z)
    f = torch.einsum("snt,sntd,sd->sn", torch.softmax(scores, -1), problem.X, problem.v)
    loss = torch.nn.functional.softplus(-problem.y * f).mean(-1).sum()
    (expected,) = torch.autograd.grad(loss, W)
    assert torch.allclose(_gradient(problem, W.detach()), expected, atol=1e-14)


def test_reproduction_quick_mode_rises_monotonically(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    # From an empty folder (the repository on PYTHONPATH): the smoke run writes its own file there.
    run = subprocess.run([sys.executable, "-m", "experiments.max_margin", "--quick"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "outputs" / "max_margin_quick.json"
    assert json.loads(out.read_text())["quick"] is True
    curve = json.loads(out.read_text())["curves"]["local"]
    means = [curve[str(s)]["mean"] for s in (10, 100, 300)]
    assert means[0] < means[1] < means[2] and means[2] > 0.9, means
    assert out.with_suffix(".png").stat().st_size > 5000
    result = track_gradient_descent(make_problem(seeds=2), steps=20, record=[20])
    assert torch.allclose(correlation(result["W_mm"], result["W_mm"]), torch.ones(2, dtype=torch.float64))
