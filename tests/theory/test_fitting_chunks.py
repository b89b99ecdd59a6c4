"""The batched engine's chunking of the replication axis and its shortcuts give the same fits."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from robust_rlhf.simulate import get_scenario, sample
from robust_rlhf.theory import fitting
from robust_rlhf.theory.data import PairData
from robust_rlhf.theory.fitting import _Batch, _derivatives, _memory_chunks, fit
from robust_rlhf.theory.losses import Logistic, SmoothedTruncatedHinge, TruncatedHinge

TOL = 1e-8


@pytest.fixture(scope="module")
def data() -> PairData:
    return sample(get_scenario("annotator_mixture"), n=300, seed=2, reps=12, M=4, unlabelled=20,
                  aux="noisy_oracle").to_pair_data()


def _budgets(monkeypatch: pytest.MonkeyPatch, memory: int, cache: int) -> None:
    monkeypatch.setattr(fitting, "MEMORY_BUDGET", memory)
    monkeypatch.setattr(fitting, "CACHE_BLOCK", cache)


def _lambda_min(data: PairData, theta: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Smallest eigenvalue of the objective's Hessian at ``theta``, per replication."""
    b = _Batch.from_data(data)
    _, _, H = _derivatives(Logistic(), torch.as_tensor(lam), b, torch.as_tensor(theta))
    return torch.linalg.eigvalsh(H)[:, 0].numpy()


@pytest.mark.parametrize("method", ["mle", "vrpo", "vrpo_tuned"])
def test_one_replication_chunks_match_one_block(data: PairData, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Budgets of one byte force one replication per chunk and per Newton block. Both fits stop at a
    gradient norm below TOL, so for a strongly convex objective with Hessian >= l_min I the estimates
    differ by at most ||g_1 - g_2|| / l_min < 2 TOL / l_min. The split MLE starts its later blocks at the
    first block's mean estimate (``_blockwise``'s pooled start), so their Newton paths are shorter."""
    _budgets(monkeypatch, 2**40, 2**40)
    whole = fit(data, method)
    _budgets(monkeypatch, 1, 1)
    b = _Batch.from_data(data)
    assert len(_memory_chunks(b, data.reps)) == data.reps
    split = fit(data, method)
    assert whole.converged.all() and split.converged.all()
    bound = 2 * TOL / _lambda_min(data, whole.theta, whole.lam)
    assert (np.abs(split.theta - whole.theta).max(axis=1) <= bound).all()
    np.testing.assert_allclose(split.lam, whole.lam, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(split.cov, whole.cov, rtol=1e-5, atol=1e-12)
    assert (split.n_iter <= whole.n_iter + 1).all()
    if method == "mle":  # the pooled start shortens the later blocks (VRPO starts at each MLE either way)
        assert split.n_iter[1:].mean() < whole.n_iter[1:].mean()


def test_memory_chunks_respect_the_budget(data: PairData, monkeypatch: pytest.MonkeyPatch) -> None:
    b = _Batch.from_data(data)
    pair_bytes = 8 * (data.d + 1 + 16)
    per_rep = b.pairs() * pair_bytes + 8 * 4 * b.n_clusters * data.d
    for reps in (1, 3, 5):
        _budgets(monkeypatch, reps * per_rep, 2**20)
        chunks = _memory_chunks(b, data.reps)
        assert [c.stop - c.start for c in chunks[:-1]] == [reps] * (len(chunks) - 1)
        assert chunks[0].start == 0 and chunks[-1].stop == data.reps
        assert all(a.stop == c.start for a, c in zip(chunks, chunks[1:]))


def test_mle_never_reads_the_reference_pairs(data: PairData, monkeypatch: pytest.MonkeyPatch) -> None:
    """With lam = 0 the reference terms are multiplied by zero: the MLE on data with reference pairs is
    bit for bit the MLE on the labelled pairs alone, and its work counts only labelled pairs."""
    _budgets(monkeypatch, 2**40, 2**40)
    fitting._WORK.reset()
    with_ref = fit(data, "mle")
    work = (fitting._WORK.gram_pairs, fitting._WORK.grad_pairs, fitting._WORK.value_pairs)
    labelled_only = replace(data, g=None, dphi_ref=None, g_ref=None, ref_weight=None, ref_row=None)
    fitting._WORK.reset()
    alone = fit(labelled_only, "mle")
    assert work == (fitting._WORK.gram_pairs, fitting._WORK.grad_pairs, fitting._WORK.value_pairs)
    np.testing.assert_array_equal(with_ref.theta, alone.theta)
    np.testing.assert_array_equal(with_ref.cov, alone.cov)


def test_logistic_vrpo_skips_the_zero_labelled_hessian(data: PairData) -> None:
    """Logistic, lam = 1: m''_Z = m''_g, so the labelled pairs add nothing to the Hessian and their Gram
    product is skipped; the fit still matches the one at lam = 1 - 2^-30 up to the O(2^-30) shift."""
    fitting._WORK.reset()
    res = fit(data, "vrpo")
    assert fitting._WORK.grad_pairs > 0
    near = fit(data, "vrpo", lam=1.0 - 2.0**-30)
    np.testing.assert_allclose(res.theta, near.theta, atol=1e-6)


@pytest.mark.parametrize("loss", [Logistic(), TruncatedHinge(), SmoothedTruncatedHinge(s=-0.5, bandwidth=0.1)])
def test_pair_derivatives_many_is_pair_derivatives(loss) -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 50, generator=gen, dtype=torch.float64) * 5
    gs = (torch.rand(3, 50, generator=gen, dtype=torch.float64), (torch.rand(3, 50, generator=gen) > 0.5).double(), 0.3)
    for got, g in zip(loss.pair_derivatives_many(z, gs), gs):
        for a, b in zip(got, loss.pair_derivatives(z, g)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("sizes, want", [
    ({"index0": "48K", "index2": "1024K", "index3": "32768K"}, 16 * 2**20),  # half the L3
    ({"index0": "48K", "index2": "1024K"}, 2**20),  # half of 1 MB, raised to the 1 MB floor
    ({"index3": "1G"}, 32 * 2**20),  # capped at MEMORY_BUDGET
    ({"index3": "unknown"}, 4 * 2**20),  # unreadable sizes: the default
    ({}, 4 * 2**20),  # no cache listing (not Linux): the default
])
def test_cache_block_from_the_processor_caches(sizes: dict, want: int, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fitting, "MEMORY_BUDGET", 32 * 2**20)
    for name, size in sizes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    assert fitting._cache_block(tmp_path) == want
