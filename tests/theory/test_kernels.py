"""The compiled kernels: closed-form sums, the engine's two paths, building and falling back."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_rlhf.simulate import get_scenario, sample
from robust_rlhf.theory import fitting, kernels
from robust_rlhf.theory.data import PairData
from robust_rlhf.theory.errors import SeparableDataError
from robust_rlhf.theory.losses import Squared

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no compiled kernel: {kernels.unavailable_reason()}")


def _reference(X: torch.Tensor, a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor):
    """The module docstring's sums, written directly (softplus and sigmoid from torch)."""
    u = torch.einsum("rpd,rd->rp", X, theta)
    s = torch.sigmoid(u)
    value = (a * torch.nn.functional.softplus(u, threshold=1000.0) - b * u).sum(1)
    grad = torch.einsum("rpd,rp->rd", X, a * s - b)
    hess = torch.einsum("rpj,rpk,rp->rjk", X, X, a * s * (1 - s))
    return value, grad, hess, u


def _inputs(R: int, P: int, d: int, seed: int, scale: float = 1.0, zero_rows: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(R, P, d, generator=gen, dtype=torch.float64)
    a = torch.rand(R, P, generator=gen, dtype=torch.float64) / P
    a[:zero_rows] = 0.0  # VRPO's labelled pairs at lam = 1: a linear objective
    b = torch.rand(R, P, generator=gen, dtype=torch.float64) / P
    theta = scale * torch.randn(R, d, generator=gen, dtype=torch.float64)
    return X, a, b, theta


@given(R=st.integers(1, 5), P=st.integers(1, 700), d=st.integers(1, 17), seed=st.integers(0, 2**16),
       scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_sums_match_closed_form(R: int, P: int, d: int, seed: int, scale: float) -> None:
    """Any shape (chunk remainders, d not a multiple of the 4-way blocking, one replication split over
    threads) and margins up to |u| ~ 100, where softplus and sigmoid saturate."""
    X, a, b, theta = _inputs(R, P, d, seed, scale, zero_rows=R // 2)
    rec = (torch.empty(R, dtype=torch.float64), torch.empty(R, dtype=torch.float64))
    y = torch.sign(torch.randn(R, P, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    against = (y, torch.empty(R, dtype=torch.float64))
    value, grad, hess = kernels.logistic_eval(X, a, b, theta, recession=rec, against=against)
    ref = _reference(X, a, b, theta)
    slope = (a * torch.relu(ref[3]) - b * ref[3]).sum(1)  # lim_t L(t theta) / t
    assert torch.equal(against[1], (y * ref[3] < 0).sum(1).double())
    for got, want in zip((value, grad, hess, *rec), (*ref[:3], slope, ref[3].abs().sum(1))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13 * (1 + float(want.abs().max())))
    assert torch.equal(hess, hess.transpose(1, 2))


@pytest.mark.parametrize("R, P, d", [(2, 1500, 45), (1, 1031, 64), (2, 700, 200)])
def test_sums_match_closed_form_at_large_d(R: int, P: int, d: int) -> None:
    """The larger blocks of pairs from d = 40 (512 pairs against 128 at d = 10), with a partial last block."""
    X, a, b, theta = _inputs(R, P, d, seed=5, scale=0.3, zero_rows=R // 2)
    for got, want in zip(kernels.logistic_eval(X, a, b, theta), _reference(X, a, b, theta)[:3]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13 * (1 + float(want.abs().max())))


def test_modes_accumulate_and_thread_split() -> None:
    X, a, b, theta = _inputs(3, 5000, 6, seed=1)
    value, grad, hess = kernels.logistic_eval(X, a, b, theta)
    v0, g0, h0 = kernels.logistic_eval(X, a, b, theta, mode=0)
    assert g0 is None and h0 is None and torch.equal(v0, value)
    v1, g1, h1 = kernels.logistic_eval(X, a, b, theta, mode=1)
    assert h1 is None and torch.equal(g1, grad)
    out = (value.clone(), grad.clone(), hess.clone())
    kernels.logistic_eval(X, a, b, theta, out=out)
    for twice, once in zip(out, (value, grad, hess)):
        torch.testing.assert_close(twice, 2 * once, rtol=1e-15, atol=0)
    # one replication on several threads (pair ranges) and on one: the same sums to rounding
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = kernels.logistic_eval(X[:1], a[:1], b[:1], theta[:1])
    finally:
        torch.set_num_threads(threads)
    for s, p in zip(serial, kernels.logistic_eval(X[:1], a[:1], b[:1], theta[:1])):
        torch.testing.assert_close(s, p, rtol=1e-13, atol=1e-15)


def test_bad_arguments_are_named() -> None:
    X, a, b, theta = _inputs(2, 10, 3, seed=0)
    with pytest.raises(ValueError, match="a must be a contiguous float64"):
        kernels.logistic_eval(X, a.float(), b, theta)
    with pytest.raises(ValueError, match=r"theta must be .* shape \(2, 3\)"):
        kernels.logistic_eval(X, a, b, theta[:, :2].contiguous())
    with pytest.raises(ValueError, match="X must be"):
        kernels.logistic_eval(X.transpose(1, 2), a, b, theta)
    phi, target = torch.zeros(4, 3, 2, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"phi must be .* shape \(4, 3, 2\)"):
        kernels.policy_regret(torch.zeros(5, 2, dtype=torch.float64), phi[..., :1], target, tie=0.0)
    with pytest.raises(ValueError, match="a KL policy needs pi_ref and policy_beta"):
        kernels.policy_regret(torch.zeros(5, 2, dtype=torch.float64), phi, target, tie=0.0, policy_beta=1.0)


def test_policy_regret_closed_form() -> None:
    """One prompt, K = 3, rewards (1, 1, 0) at theta = 1: the greedy policy splits over the tie, the KL
    policy is ``pi_ref e^{r / beta} / Z``; a greedy response off the optimum's support costs ``inf``."""
    phi = torch.tensor([[[1.0], [1.0], [0.0]]], dtype=torch.float64)
    theta = torch.ones(1, 1, dtype=torch.float64)
    gap = torch.tensor([[0.0, 2.0, 4.0]], dtype=torch.float64)
    assert float(kernels.policy_regret(theta, phi, gap, tie=1e-12)) == pytest.approx(1.0, rel=1e-15)
    ref = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    z = 0.5 * np.e + 0.25 * np.e + 0.25
    pol = np.array([0.5 * np.e, 0.25 * np.e, 0.25]) / z
    got = kernels.policy_regret(theta, phi, gap, tie=1e-12, pi_ref=ref, policy_beta=1.0)
    assert float(got) == pytest.approx(pol @ [0.0, 2.0, 4.0], rel=1e-14)
    log_opt = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64))
    kl = kernels.policy_regret(theta, phi, log_opt, tie=1e-12, pi_ref=ref, policy_beta=1.0,
                               opt_support=torch.ones(1, 3, dtype=torch.bool), measure_beta=2.0)
    assert float(kl) == pytest.approx(2.0 * float(pol @ (np.log(pol) - np.log([0.2, 0.3, 0.5]))), rel=1e-13)
    off = kernels.policy_regret(theta, phi, log_opt, tie=1e-12, opt_support=torch.tensor([[True, False, True]]),
                                measure_beta=2.0)
    assert float(off) == np.inf


@pytest.fixture(scope="module")
def data() -> PairData:
    return sample(get_scenario("annotator_mixture"), n=400, seed=3, reps=10, M=4, unlabelled=25,
                  aux="noisy_oracle").to_pair_data()


@pytest.fixture(scope="module")
def odd_data() -> PairData:
    """Pair counts off the eight lanes (n = 203, N = 630): the compiled loop pads its transposed rows."""
    return sample(get_scenario("annotator_mixture"), n=203, seed=4, reps=4, M=3, unlabelled=7,
                  aux="noisy_oracle").to_pair_data()


def _torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(kernels._state, "lib", None)
    monkeypatch.setitem(kernels._state, "reason", "switched off by the test")


@pytest.mark.parametrize("method", ["mle", "vrpo", "vrpo_tuned", "vrpo_crossfit"])
def test_engine_paths_agree(data: PairData, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel and the torch path fit the same estimates: both stop below the gradient tolerance
    1e-10 x rms(dphi), so their estimates differ by at most ||H^-1|| tol ~ 1e-9."""
    fast = fitting.fit(data, method, tol=1e-10)
    _torch_path(monkeypatch)
    assert not kernels.available()
    slow = fitting.fit(data, method, tol=1e-10)
    assert fast.converged.all() and slow.converged.all()
    np.testing.assert_allclose(fast.theta, slow.theta, rtol=0, atol=1e-8)
    np.testing.assert_allclose(fast.cov, slow.cov, rtol=1e-7, atol=0)
    np.testing.assert_allclose(fast.lam, slow.lam, rtol=0, atol=1e-8)


def test_engine_paths_agree_on_separation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlap certificate reads the kernel's margins: a separable replication is flagged on both
    paths (the VR objective's recession certificate: ``test_fitting``'s unbounded cases, kernel path)."""
    data = sample(get_scenario("bt"), n=40, seed=0, reps=3, M=4, aux="oracle").to_pair_data()
    z = data.z.copy()
    z[1] = (data.dphi[1] @ np.ones(data.d) > 0).astype(float)  # separated by theta = (1, ..., 1)
    sep = replace(data, z=z)
    for path in ("kernel", "torch"):
        if path == "torch":
            _torch_path(monkeypatch)
        with pytest.raises(SeparableDataError, match="replication 1"):
            fitting.fit(sep, "mle")
        with pytest.warns(RuntimeWarning, match="replication 1"):
            res = fitting.fit(sep, "mle", on_separable="warn")
        assert res.separable.tolist() == [False, True, False]


def test_engine_work_counts_the_kernel(data: PairData) -> None:
    fitting._WORK.reset()
    fitting.fit(data, "mle")
    assert fitting._WORK.kernel_pairs > 0 and fitting._WORK.gram_pairs == 0


def test_missing_compiler_falls_back(monkeypatch: pytest.MonkeyPatch, data: PairData,
                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert not kernels.available()
    assert "no-such-compiler-xyz" in kernels.unavailable_reason()
    assert "slower torch path" in caplog.text
    assert fitting.fit(data, "mle").converged.all()


def test_failed_build_falls_back_and_build_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("ROBUST_RLHF_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    assert not kernels.available()
    assert "could not build" in kernels.unavailable_reason()
    assert not list(tmp_path.glob("*.so"))  # nothing half-written is left in the cache
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.available()
    assert len(list(tmp_path.glob("kernels-*.so"))) == 1


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("ROBUST_RLHF_KERNELS", "0")
    assert kernels.unavailable_reason() == "disabled by ROBUST_RLHF_KERNELS=0"


@pytest.mark.parametrize("loss", [fitting.Logistic(), Squared()], ids=["logistic_fused", "ipo"])
@pytest.mark.parametrize("control", [False, True])
def test_cluster_moments_match_cluster_sums(data: PairData, control: bool, loss, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """The kernels' meat moments (``logistic_cluster_moments`` for the logistic loss, ``cluster_moments`` of
    the torch coefficients for another) equal ``_cluster_cov`` of the (R, C, d) cluster sums, with
    unlabelled prompts (clusters without a labelled row) present and unequal reference weights."""
    b = fitting._Batch.from_data(data)
    assert b.n_clusters > data.n
    w = torch.as_tensor(np.random.default_rng(2).random(b.w_ref.shape))  # a kernel ignoring w_ref would fail
    b = replace(b, w_ref=w / w.sum(1, keepdim=True))
    theta = torch.as_tensor(np.random.default_rng(0).normal(size=(data.reps, data.d)))
    fast = fitting._meat_moments(loss, b, theta, control)
    _torch_path(monkeypatch)
    slow = fitting._meat_moments(loss, b, theta, control)
    for got, want in zip(fast, slow):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-14 * float(want.abs().max()))


@given(R=st.integers(1, 3), n=st.integers(2, 150), extra=st.integers(0, 40), N=st.integers(0, 300),
       d=st.integers(1, 17), seed=st.integers(0, 2**16))
def test_cluster_moments_match_closed_form(R: int, n: int, extra: int, N: int, d: int, seed: int) -> None:
    """Any shape (d not a multiple of the 4 x 4 tiles, cluster counts off the 8 lanes, no reference pairs,
    prompts without them): the centred cross-products of the cluster sums, written directly."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    C = n + extra
    X, X_ref = torch.randn(R, n, d, generator=gen, dtype=f64), torch.randn(R, N, d, generator=gen, dtype=f64)
    cA, cB = torch.randn(R, n, generator=gen, dtype=f64), torch.randn(R, n, generator=gen, dtype=f64)
    cR = torch.randn(R, N, generator=gen, dtype=f64)
    cluster = torch.randint(0, C, (N,), generator=gen)
    A, B = torch.zeros(R, C, d, dtype=f64), torch.zeros(R, C, d, dtype=f64)
    A[:, :n], B[:, :n] = cA[..., None] * X, cB[..., None] * X
    B.index_add_(1, cluster, cR[..., None] * X_ref)

    def cross(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(R, d, d, dtype=f64)
        for part in (slice(0, n), slice(n, C)):
            Up, Vp = U[:, part], V[:, part]
            k = Up.shape[1]
            if k:
                out += (Up - Up.mean(1, keepdim=True)).transpose(1, 2) @ (Vp - Vp.mean(1, keepdim=True)) * (
                    k / max(k - 1, 1))
        return out

    got = kernels.cluster_moments(X, cA, cB, X_ref, cR, cluster, C)
    for g_, want in zip(got, (cross(A, A), cross(A, B), cross(B, B))):
        torch.testing.assert_close(g_, want, rtol=1e-12, atol=1e-12 * (1 + float(want.abs().max())))
    alone = kernels.cluster_moments(X, cA, None, None, None, None, C)
    assert alone[1] is None and alone[2] is None
    torch.testing.assert_close(alone[0], cross(A[:, :n], A[:, :n]), rtol=1e-12,
                               atol=1e-12 * (1 + float(alone[0].abs().max())))


def test_margins_and_moment_arguments(data: PairData) -> None:
    b = fitting._Batch.from_data(data)
    theta = torch.ones(data.reps, data.d, dtype=torch.float64)
    torch.testing.assert_close(kernels.margins(b.dphi_ref, theta), fitting._margins(b.dphi_ref, theta),
                               rtol=1e-13, atol=1e-13)
    cA = torch.ones(data.reps, data.n, dtype=torch.float64)
    cR = torch.ones(b.dphi_ref.shape[:2], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cluster ids must lie in \[0, "):
        kernels.cluster_moments(b.dphi, cA, cA, b.dphi_ref, cR, b.ref_cluster + b.n_clusters, b.n_clusters)
    with pytest.raises(ValueError, match="the control terms need X_ref, cR and cluster"):
        kernels.cluster_moments(b.dphi, cA, cA, None, None, None, b.n_clusters)
    with pytest.raises(ValueError, match="the control terms need X_ref, g_ref and cluster"):
        kernels.logistic_cluster_moments(b.dphi, b.z, theta, b.g, b.dphi_ref, None, None, b.ref_cluster, b.n_clusters)
    with pytest.raises(ValueError, match=r"logistic_cluster_moments: w_ref must be .* of shape \(10, 1700\)"):
        kernels.logistic_cluster_moments(b.dphi, b.z, theta, b.g, b.dphi_ref, b.g_ref, b.w_ref[:, 1:], b.ref_cluster,
                                         b.n_clusters)
    with pytest.raises(ValueError, match=r"theta must be .* of shape \(10, 3\)"):
        kernels.logistic_cluster_moments(b.dphi, b.z, theta[:, 1:])
    with pytest.raises(ValueError, match=r"X must be .* \(not contiguous\)"):
        kernels.margins(b.dphi.transpose(1, 2).contiguous().transpose(1, 2), theta)


def test_logistic_moments_equal_weights_by_default(data: PairData) -> None:
    """Without ``w_ref`` every reference pair weighs ``1/N``; equal to passing those weights."""
    b = fitting._Batch.from_data(data)
    theta = torch.as_tensor(np.random.default_rng(1).normal(size=(data.reps, data.d)))
    N = b.dphi_ref.shape[1]
    args = (b.dphi, b.z, theta, b.g, b.dphi_ref, b.g_ref)
    got = kernels.logistic_cluster_moments(*args, None, b.ref_cluster, b.n_clusters)
    want = kernels.logistic_cluster_moments(*args, torch.full((data.reps, N), 1.0 / N, dtype=torch.float64),
                                            b.ref_cluster, b.n_clusters)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-14, atol=0.0)


def test_logistic_meat_at_a_fixed_lam_is_the_quadratic(data: PairData) -> None:
    """With ``lam`` the kernel returns ``V(lam) = V_AA + lam (V_AB + V_AB^T) + lam^2 V_BB`` itself (one Gram of
    ``A + lam B``), with unlabelled prompts and unequal weights, a different ``lam`` per replication."""
    b = fitting._Batch.from_data(data)
    assert b.n_clusters > data.n
    w = torch.as_tensor(np.random.default_rng(4).random(b.w_ref.shape))
    b = replace(b, w_ref=w / w.sum(1, keepdim=True))
    theta = torch.as_tensor(np.random.default_rng(5).normal(size=(data.reps, data.d)))
    lam = torch.linspace(-0.5, 2.0, data.reps, dtype=torch.float64)
    args = (b.dphi, b.z, theta, b.g, b.dphi_ref, b.g_ref, b.w_ref, b.ref_cluster, b.n_clusters)
    V, none_ab, none_bb = kernels.logistic_cluster_moments(*args, lam=lam)
    assert none_ab is None and none_bb is None
    want = fitting._meat(kernels.logistic_cluster_moments(*args), lam)
    torch.testing.assert_close(V, want, rtol=1e-11, atol=1e-14 * float(want.abs().max()))
    fitting._WORK.reset()
    moments = fitting._meat_moments(fitting.Logistic(), b, theta, True, lam)
    assert moments[1] is None and fitting._WORK.cluster_rows == data.reps * b.n_clusters
    torch.testing.assert_close(fitting._meat(moments, lam), want, rtol=1e-11, atol=1e-14 * float(want.abs().max()))


@pytest.mark.parametrize("layout", ["runs", "shuffled"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_logistic_meat_of_one_replication_over_threads(data: PairData, layout: str, threads: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One replication's ``V(lam)`` split over the threads (its pairs, clusters and, when each prompt's reference
    pairs form a run, those runs) equals the quadratic of the unsplit moments, for prompts in runs and for
    reference pairs in shuffled order (added by one thread); the meat without control terms equals
    ``n`` times the sample covariance of the pairs' scores."""
    b = fitting._Batch.from_data(data)
    one = lambda t: t[:1].contiguous()  # noqa: E731
    X_ref, g_ref, w_ref, cluster = one(b.dphi_ref), one(b.g_ref), one(b.w_ref), b.ref_cluster
    if layout == "shuffled":
        perm = torch.as_tensor(np.random.default_rng(6).permutation(cluster.shape[0]))
        X_ref, g_ref, w_ref, cluster = X_ref[:, perm].contiguous(), g_ref[:, perm].contiguous(), \
            w_ref[:, perm].contiguous(), cluster[perm].contiguous()
    theta = torch.as_tensor(np.random.default_rng(5).normal(size=(1, data.d)))
    args = (one(b.dphi), one(b.z), theta, one(b.g), X_ref, g_ref, w_ref, cluster, b.n_clusters)
    lam = torch.tensor([0.7], dtype=torch.float64)
    want = fitting._meat(kernels.logistic_cluster_moments(*args), lam)
    X, z = one(b.dphi), one(b.z)
    y = ((torch.sigmoid(X[0] @ theta[0]) - z[0]) / data.n)[:, None] * X[0]  # no control terms: the labelled pairs
    plain = torch.cov(y.T, correction=1)[None] * data.n
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    V = kernels.logistic_cluster_moments(*args, lam=lam)[0]
    torch.testing.assert_close(V, want, rtol=1e-11, atol=1e-14 * float(want.abs().max()))
    V0 = kernels.logistic_cluster_moments(X, z, theta)[0]
    torch.testing.assert_close(V0, plain, rtol=1e-11, atol=1e-14 * float(plain.abs().max()))


@given(d=st.integers(1, 17), seed=st.integers(0, 2**16))
def test_spd_factor_matches_lapack(d: int, seed: int) -> None:
    """The compiled Cholesky test and inverse agree with torch's LAPACK calls: a positive definite matrix of
    condition 1e8 (its inverse to 1e-6 of its largest entry; condition times eps is 2e-8), and indefinite,
    singular, non-finite and overflowing ones (not positive definite)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(6, d, d, generator=gen, dtype=torch.float64))
    ev = torch.logspace(0, 8, d, dtype=torch.float64).expand(6, d).clone()
    ev[1, 0] = -1e-3  # indefinite
    A = (Q * ev[:, None, :]) @ Q.transpose(1, 2)
    A = 0.5 * (A + A.transpose(1, 2))
    A[2, :, 0] = A[2, 0, :] = 0.0  # singular (a matrix singular only at rounding level may pass either test)
    A[3, 0, 0] = torch.nan
    A[4, d - 1, d - 1] = torch.inf
    A[5] = torch.eye(d, dtype=torch.float64)
    A[5, 0, 0] = 1e-200
    if d > 1:  # L_10 = 1e300: L_10^2 overflows
        A[5, 0, 1] = A[5, 1, 0] = 1e200
    ok, inv = kernels.spd_factor(A, inverse=True)
    finite = torch.isfinite(A).all(dim=(1, 2))
    L, info = torch.linalg.cholesky_ex(torch.where(torch.isfinite(A), A, 0.0))
    want = (info == 0) & finite & torch.isfinite(L).all(dim=(1, 2))
    assert ok.tolist() == want.tolist()
    assert bool(ok[0]) and not ok[1] and not ok[3:5].any() and bool(ok[5]) == (d == 1)
    want_inv = torch.cholesky_inverse(torch.linalg.cholesky(A[0]))
    torch.testing.assert_close(inv[0], want_inv, rtol=0, atol=1e-6 * float(want_inv.abs().max()))
    assert torch.isnan(inv[~ok]).all()
    assert torch.equal(kernels.spd_factor(A)[0], ok) and kernels.spd_factor(A)[1] is None


def test_rows_select_without_copying() -> None:
    """``rows`` evaluates replications in place: the same sums as on the copied subset, in its order."""
    X, a, b, theta = _inputs(6, 300, 4, seed=5, zero_rows=2)
    rows = torch.tensor([4, 1, 1, 0])
    y = torch.sign(torch.randn(6, 300, dtype=torch.float64))
    got_against = (y, torch.empty(4, dtype=torch.float64))
    got = kernels.logistic_eval(X, a, b, theta[rows].contiguous(), rows=rows, against=got_against)
    want_against = (y[rows].contiguous(), torch.empty(4, dtype=torch.float64))
    want = kernels.logistic_eval(X[rows].contiguous(), a[rows].contiguous(), b[rows].contiguous(),
                                 theta[rows].contiguous(), against=want_against)
    for g_, w_ in zip((*got, got_against[1]), (*want, want_against[1])):
        assert torch.equal(g_, w_)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 6\)"):
        kernels.logistic_eval(X, a, b, theta[:1].contiguous(), rows=torch.tensor([6]))


def _hand_back(b, lam, theta0, *args):
    """A ``_kernel_newton`` that takes no step: every replication goes to the Python loop."""
    R = theta0.shape[0]
    zeros = torch.zeros(R, dtype=torch.int64)
    return kernels.NewtonResult(theta0.clone(), torch.zeros(R, dtype=torch.bool), torch.zeros_like(theta0),
                                torch.zeros(R, *theta0.shape[1:] * 2, dtype=torch.float64), zeros, zeros)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 1.2])
@pytest.mark.parametrize("which", ["data", "odd_data"])
def test_compiled_newton_takes_the_python_loops_steps(which: str, lam: float, monkeypatch: pytest.MonkeyPatch,
                                                      request: pytest.FixtureRequest) -> None:
    """From the same start, the compiled loop and the Python loop (kernel evaluations, torch solves) take the
    same full Newton steps: equal iteration counts, estimates equal to rounding, the final Hessians alike;
    whether the compiled loop certifies its steps' decrease without values (weights >= 0) or, at ``lam = 1.2``
    (negative labelled weights), compares the values as the Python loop does."""
    data = request.getfixturevalue(which)
    b = fitting._Batch.from_data(data)
    R, d = data.reps, data.d
    lam_t = torch.full((R,), lam, dtype=torch.float64)
    theta0 = torch.zeros(R, d, dtype=torch.float64)
    loss, tol = fitting.Logistic(), 1e-10
    calls = []
    original = fitting._kernel_newton

    def spy(*args):
        calls.append(res := original(*args))
        return res

    monkeypatch.setattr(fitting, "_kernel_newton", spy)
    fast = fitting._newton_block(loss, lam_t, b, theta0, tol, 100, True, 1e6)
    assert len(calls) == 1 and bool(calls[0].converged.all())  # no replication needed the Python loop
    monkeypatch.setattr(fitting, "_kernel_newton", _hand_back)
    slow = fitting._newton_block(loss, lam_t, b, theta0, tol, 100, True, 1e6)
    assert fast.converged.all() and slow.converged.all() and not (fast.separable | slow.separable).any()
    assert torch.equal(fast.n_iter, slow.n_iter) and int(fast.n_iter.min()) >= 3
    torch.testing.assert_close(fast.theta, slow.theta, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.hess, slow.hess, rtol=1e-10, atol=0)
    assert float(fast.grad_norm.max()) < tol


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_compiled_newton_pre_step(data: PairData, lam: float) -> None:
    """The pre-step with the mean Hessian of a few estimates, from their mean: one gradient-only evaluation per
    replication, fewer Newton iterations, the same minimisers (within ``||H^-1|| tol``); a pre-Hessian without
    a Cholesky factor takes no pre-step (the plain loop's iterates exactly), a misshapen one is refused."""
    X, z = torch.as_tensor(data.dphi), torch.as_tensor(data.z)
    R, n, d = X.shape
    kw = dict(tol=1e-10, theta_max=1e6, max_iter=100, certificate=True, meat=True)
    if lam:
        kw.update(g=torch.as_tensor(data.g), X_ref=torch.as_tensor(data.dphi_ref),
                  g_ref=torch.as_tensor(data.g_ref), w_ref=torch.as_tensor(data.ref_weight),
                  lam=torch.full((R,), lam, dtype=torch.float64),
                  cluster=fitting._Batch.from_data(data).ref_cluster, n_clusters=fitting._Batch.from_data(data).n_clusters)
    cold = kernels.logistic_newton(X, z, torch.zeros(R, d, dtype=torch.float64), **kw)
    start = cold.theta[:3].mean(0).expand(R, d).contiguous()
    plain = kernels.logistic_newton(X, z, start, **kw)
    pre = kernels.logistic_newton(X, z, start, pre_hess=cold.hess[:3].mean(0), **kw)
    assert plain.presteps is None and bool(pre.presteps.all()) and pre.converged.all() and plain.converged.all()
    assert int(pre.iters.sum()) < int(plain.iters.sum())
    bound = 1e-10 * float(torch.linalg.matrix_norm(torch.linalg.inv(cold.hess), ord=2).max())
    torch.testing.assert_close(pre.theta, cold.theta, rtol=0, atol=2 * bound)
    torch.testing.assert_close(pre.meat, cold.meat, rtol=1e-6, atol=0)
    flat = kernels.logistic_newton(X, z, start, pre_hess=torch.zeros(d, d, dtype=torch.float64), **kw)
    assert not flat.presteps.any() and torch.equal(flat.theta, plain.theta) and torch.equal(flat.iters, plain.iters)
    with pytest.raises(ValueError, match="pre_hess"):
        kernels.logistic_newton(X, z, start, pre_hess=torch.eye(d + 1, dtype=torch.float64), **kw)


def test_pooled_start_takes_the_pre_step() -> None:
    """``fit`` on more replications than its cold pooled block: the others make the pre-step's gradient-only
    evaluation (counted as gradient work) and converge."""
    data = sample(get_scenario("bt"), n=300, seed=2, reps=fitting.POOL_REPS + 8).to_pair_data()
    fitting._WORK.reset()
    res = fitting.fit(data, "mle")
    assert res.converged.all() and fitting._WORK.grad_pairs == 8 * data.n


def test_compiled_newton_hands_back_what_needs_safeguards(data: PairData) -> None:
    """A separated replication (its certificate) and ``max_iter`` stop the compiled loop with ``converged``
    False, where the Python loop takes over; the others converge. ``rows`` selects without copying."""
    X = torch.as_tensor(data.dphi)
    R, n, d = X.shape
    z = torch.as_tensor(data.z).clone()
    z[1] = (X[1] @ torch.ones(d, dtype=torch.float64) > 0).double()  # separated by theta = (1, ..., 1)
    zero = torch.zeros(R, d, dtype=torch.float64)
    kw = dict(tol=1e-9, theta_max=1e6, certificate=True)
    res = kernels.logistic_newton(X, z, zero, max_iter=100, **kw)
    assert res.converged.tolist() == [r != 1 for r in range(R)]
    assert float(res.grad[res.converged].norm(dim=1).max()) < 1e-9
    capped = kernels.logistic_newton(X, z, zero, max_iter=1, **kw)
    assert not capped.converged.any() and int(capped.iters.max()) == 1
    torch.testing.assert_close(capped.theta[0], res.theta[0], rtol=0.5, atol=0.5)  # one step towards it
    rows = torch.tensor([3, 0], dtype=torch.int64)
    picked = kernels.logistic_newton(X, z, zero[:2], max_iter=100, rows=rows, **kw)
    torch.testing.assert_close(picked.theta, res.theta[rows], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="rows must lie"):
        kernels.logistic_newton(X, z, zero[:1], max_iter=5, rows=torch.tensor([R]), **kw)
    with pytest.raises(ValueError, match="theta0"):
        kernels.logistic_newton(X, z, zero[:, :1], max_iter=5, **kw)
    with pytest.raises(ValueError, match="g needs lam"):
        kernels.logistic_newton(X, z, zero, max_iter=5, g=z, **kw)
    with pytest.raises(ValueError, match="reference pairs need g_ref"):
        kernels.logistic_newton(X, z, zero, max_iter=5, g=z, X_ref=X, lam=zero[:, 0], **kw)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("which", ["data", "odd_data", "shuffled"])
def test_compiled_newton_forms_the_meat(which: str, lam: float, request: pytest.FixtureRequest) -> None:
    """The meat the compiled loop forms at its estimate equals the moments kernel's ``V(lam)`` there, with
    unlabelled prompts and unequal reference weights (``lam = 0``: the labelled pairs alone, as the MLE's
    sandwich takes them); a replication handed back gets NaN, which ``_sandwiches`` forms afresh. The reference
    pairs come prompt by prompt (each cluster a run of ``M``: summed run by run) or, ``shuffled``, in any order
    (summed pair by pair)."""
    data = request.getfixturevalue("data" if which == "shuffled" else which)
    b = fitting._Batch.from_data(data)
    w = torch.as_tensor(np.random.default_rng(6).random(b.w_ref.shape))
    b = replace(b, w_ref=w / w.sum(1, keepdim=True), z=b.z.clone())
    if which == "shuffled":
        p = torch.as_tensor(np.random.default_rng(7).permutation(b.ref_cluster.numel()))
        b = replace(b, dphi_ref=b.dphi_ref[:, p].contiguous(), g_ref=b.g_ref[:, p].contiguous(),
                    w_ref=b.w_ref[:, p].contiguous(), ref_cluster=b.ref_cluster[p].contiguous())
    R, d = data.reps, data.d
    b.z[2] = (b.dphi[2] @ torch.ones(d, dtype=torch.float64) > 0).double()  # separated: handed back at lam = 0
    lam_t = torch.full((R,), lam, dtype=torch.float64)
    loss = fitting.Logistic()
    fitting._WORK.reset()
    res = fitting._kernel_newton(b.with_kernel(loss, lam_t), lam_t, torch.zeros(R, d, dtype=torch.float64), 1e-10,
                                 100, True, 1e6, True)
    ok = res.converged
    assert res.meat is not None and int(ok.sum()) >= R - 1 and bool(torch.isnan(res.meat[~ok]).all())
    clusters = b.n_clusters if lam else data.n
    assert fitting._WORK.cluster_rows == int(ok.sum()) * clusters
    want = fitting._sandwiches_meat(loss, b.subset(ok.nonzero().squeeze(1)), res.theta[ok], lam_t[ok])
    torch.testing.assert_close(res.meat[ok], want, rtol=1e-11, atol=1e-14 * float(want.abs().max()))
    hess = res.hess.clone()
    hess[~ok] = torch.eye(d, dtype=torch.float64)
    cov, _ = fitting._sandwiches(loss, b, res.theta, hess, lam_t, data.n, meat=res.meat)
    plain, _ = fitting._sandwiches(loss, b, res.theta, hess, lam_t, data.n)
    torch.testing.assert_close(cov, plain, rtol=1e-11, atol=1e-14 * float(plain.abs().max()))


def test_compiled_newton_meat_checks_its_clusters(data: PairData) -> None:
    """The meat's cluster ids must lie in ``[0, n_clusters)`` with ``n_clusters >= n``: a named error, not a
    write outside the scratch."""
    b = fitting._Batch.from_data(data)
    R, d = data.reps, data.d
    lam_t = torch.ones(R, dtype=torch.float64)
    k = b.with_kernel(fitting.Logistic(), lam_t).kern
    kw = dict(tol=1e-9, theta_max=1e6, max_iter=50, certificate=True, g=k.g, X_ref=k.X_ref, g_ref=k.g_ref,
              w_ref=k.w_ref, lam=lam_t, meat=True)
    zero = torch.zeros(R, d, dtype=torch.float64)
    with pytest.raises(ValueError, match="cluster ids must lie"):
        kernels.logistic_newton(k.X, k.z, zero, cluster=b.ref_cluster, n_clusters=int(b.ref_cluster.max()),
                                **kw)
    with pytest.raises(ValueError, match="cluster"):
        kernels.logistic_newton(k.X, k.z, zero, cluster=b.ref_cluster[:-1], n_clusters=b.n_clusters, **kw)
    with pytest.raises(ValueError, match="cluster ids are needed"):
        kernels.logistic_newton(k.X, k.z, zero, cluster=None, n_clusters=b.n_clusters, **kw)
    ok = kernels.logistic_newton(k.X, k.z, zero, cluster=b.ref_cluster, n_clusters=b.n_clusters, **kw)
    assert bool(ok.converged.all()) and bool(torch.isfinite(ok.meat).all())
