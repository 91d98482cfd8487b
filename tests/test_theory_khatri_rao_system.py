import pytest
import torch

from normonly.theory import khatri_rao, pair_condition, pair_system, solve_pair
from normonly.theory.draws import draw_pair
from normonly.theory.khatri_rao_system import pair_map

f64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def test_khatri_rao_is_the_column_wise_kronecker_product():
    A, B = _rand(3, 5), _rand(4, 5, seed=1)
    expected = torch.stack([torch.kron(A[:, k], B[:, k]) for k in range(5)], dim=1)
    assert torch.equal(khatri_rao(A, B), expected)


def test_pair_system_linearizes_the_product_in_both_vec_conventions():
    W_a, W_b, gamma = _rand(12, 3), _rand(4, 12, seed=1), _rand(12, seed=2)
    product = W_b @ torch.diag(gamma) @ W_a
    torch.testing.assert_close(pair_system(W_a, W_b) @ gamma, product.flatten())  # row-major
    torch.testing.assert_close(khatri_rao(W_a.T, W_b) @ gamma, product.T.flatten())  # paper: (W_aᵀ ⊙ W_b) γ = vec(·)


@pytest.mark.parametrize(
    "A, B, error",
    [(torch.ones(2, 3), torch.ones(2, 4), ValueError), (torch.ones(3), torch.ones(2, 3), ValueError),
     ([[1.0]], torch.ones(1, 1), TypeError)],
)
def test_khatri_rao_rejects_bad_shapes_and_types(A, B, error):
    with pytest.raises(error):
        khatri_rao(A, B)


@pytest.mark.parametrize("init", ["gaussian", "orthogonal", "orthobasis"])
@pytest.mark.parametrize("d_in, d_out", [(3, 4), (16, 16)])  # 16x16: the mixed-precision LU path (256² system)
def test_square_solve_is_exact_and_equals_the_dense_solution(init, d_in, d_out):
    W_a, W_b = draw_pair(d_in, d_out, d_in * d_out, init=init, g=torch.Generator().manual_seed(3))
    F = _rand(d_out, d_in, seed=4)
    gamma, residual = solve_pair(W_a, W_b, F)
    assert residual < 1e-12
    torch.testing.assert_close(pair_map(W_a, W_b, gamma), F, rtol=0, atol=1e-11)
    dense = torch.linalg.solve(pair_system(W_a, W_b), F.flatten())
    torch.testing.assert_close(gamma, dense, rtol=1e-8, atol=1e-10)


def test_narrow_pair_gets_the_least_squares_gamma_and_its_residual():
    W_a, W_b, F = _rand(10, 4), _rand(4, 10, seed=1), _rand(4, 4, seed=2)  # 10 unknowns, 16 equations
    gamma, residual = solve_pair(W_a, W_b, F)
    K, v = pair_system(W_a, W_b), F.flatten()
    Q, _ = torch.linalg.qr(K)
    projection_residual = torch.linalg.norm(v - Q @ (Q.T @ v)) / torch.linalg.norm(v)
    assert residual == pytest.approx(float(projection_residual), rel=1e-9)
    assert 0.1 < residual < 1


def test_singular_draw_falls_back_to_least_squares_without_nans():
    W_a, W_b, F = _rand(4, 2), _rand(2, 4, seed=1), _rand(2, 2, seed=2)
    W_a[0] = 0  # a dead unit: the system has a zero column
    gamma, residual = solve_pair(W_a, W_b, F)
    assert torch.isfinite(gamma).all() and residual > 1e-3


def test_condition_estimate_is_close_to_the_svd_value_and_inf_when_singular():
    W_a, W_b = draw_pair(5, 5, 25, init="gaussian", g=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(pair_system(W_a, W_b))
    assert pair_condition(W_a, W_b) == pytest.approx(float(s[0] / s[-1]), rel=0.5)
    W_b[:, 3] = 0
    assert pair_condition(W_a, W_b) == float("inf")
