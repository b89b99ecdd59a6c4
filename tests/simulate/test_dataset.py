"""Sampling: shapes, seeding, reference designs, auxiliary models, saving."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import expit, logit
from scipy.stats import chi2, spearmanr

from robust_rlhf.simulate import AUX_MODELS, AuxSpec, Scenario, SpecError, get_scenario, sample, save, scenario_names
from robust_rlhf.simulate.auxiliary import build_aux
from robust_rlhf.theory.data import PairData
from robust_rlhf.theory.io import load_pair_data

scenarios = st.builds(
    lambda name, d, K, fmap, seed: get_scenario(
        name, d=max(d, 2), K=K, features={"map": fmap}, structure_seed=seed),
    st.sampled_from(scenario_names()), st.integers(1, 4), st.integers(2, 5),
    st.sampled_from(["gaussian", "linear", "tanh"]), st.integers(0, 5))


@given(scenario=scenarios, n=st.integers(1, 20), reps=st.integers(1, 3), M=st.sampled_from([0, 1, 3, "exact"]),
       N=st.integers(0, 3), seed=st.integers(0, 2**20))
def test_shapes_and_ranges(scenario: Scenario, n: int, reps: int, M, N: int, seed: int) -> None:
    if M == 0:
        N = 0
    data = sample(scenario, n, seed=seed, reps=reps, M=M, unlabelled=N, aux="oracle")
    d, K, p = scenario.d, scenario.K, scenario.prompt_dim
    per = K * K if M == "exact" else M
    assert data.x.shape == (reps, n, p) and data.phi_pair.shape == (reps, n, 2, d)
    assert data.y.shape == (reps, n, 2) and ((data.y >= 0) & (data.y < K)).all()
    assert data.ref_row.shape == ((n + N) * per,)
    assert data.ref_phi_pair.shape == (reps, (n + N) * per, 2, d)
    for arr in (data.g_star, data.g_hat, data.ref_g_star, data.ref_g_hat):
        assert ((arr >= 0) & (arr <= 1)).all()
    np.testing.assert_array_equal(data.g_hat, data.g_star)  # the oracle
    assert set(np.unique(data.z)) <= {0, 1}
    if per:
        np.testing.assert_allclose(data.ref_weight.sum(1), 1.0)
        pd_ = data.to_pair_data()
        # an exact design with antisymmetric g_hat is merged to K(K-1)/2 + 1 pairs per prompt
        merged = (n + N) * (K * (K - 1) // 2 + 1) if M == "exact" and scenario.antisymmetric else (n + N) * per
        assert pd_.n_ref == merged


@given(scenario=scenarios, seed=st.integers(0, 2**20))
def test_same_seed_bit_identical_and_replications_independent_of_batch(scenario: Scenario, seed: int) -> None:
    a = sample(scenario, 30, seed=seed, reps=3, M=2, aux="noisy_oracle")
    b = sample(scenario, 30, seed=seed, reps=3, M=2, aux="noisy_oracle")
    for key in ("x", "y", "z", "g_star", "g_hat", "ref_y", "ref_g_hat"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    alone = sample(scenario, 30, seed=seed, reps=1, first_rep=2, M=2, aux="noisy_oracle")
    np.testing.assert_array_equal(alone.z[0], a.z[2])
    np.testing.assert_array_equal(alone.ref_g_hat[0], a.ref_g_hat[2])
    other = sample(scenario, 30, seed=seed + 1, reps=1, M=2)
    assert not np.array_equal(other.x[0], a.x[0])


def test_labelled_data_unchanged_across_settings() -> None:
    """Common random numbers: M, unlabelled prompts and g_hat do not move the labelled draws."""
    scenario = get_scenario("annotator_mixture")
    base = sample(scenario, 50, seed=7, reps=2, M=1)
    for kwargs in ({"M": 8}, {"M": "exact"}, {"M": 2, "unlabelled": 10}, {"aux": "random"}):
        other = sample(scenario, 50, seed=7, reps=2, **kwargs)
        for key in ("x", "y", "z"):
            np.testing.assert_array_equal(getattr(other, key), getattr(base, key))


@pytest.mark.parametrize("name", ["bt", "position_bias", "near_deterministic", "intransitive"])
def test_label_frequencies_match_g_star(name: str) -> None:
    """Sum of Z - g* over 20000 pairs is a sum of independent centred Bernoulli deviations with
    variance sum g*(1-g*): it lies within 4 of its standard deviations."""
    data = sample(get_scenario(name), 5000, seed=11, reps=4, M=0, aux=None)
    dev = (data.z - data.g_star).sum()
    sd = math.sqrt((data.g_star * (1 - data.g_star)).sum())
    assert abs(dev) < 4 * sd
    # and within bins of g*: calibration
    bins = np.digitize(data.g_star.ravel(), [0.2, 0.4, 0.6, 0.8])
    for k in range(5):
        sel = bins == k
        g, z = data.g_star.ravel()[sel], data.z.ravel()[sel]
        assert abs((z - g).sum()) < 4 * math.sqrt((g * (1 - g)).sum()) + 1e-9


def test_responses_follow_the_reference_policy() -> None:
    """Chi-square test of the response frequencies against the summed reference probabilities."""
    scenario = Scenario.from_spec({"reference": {"policy": "softmax", "temperature": 0.7}})
    data = sample(scenario, 3000, seed=2, M=3, aux=None)
    pi = scenario.reference.probs(scenario.phi(data.x))[0]
    expected = pi.sum(0) * 2 + np.repeat(pi, 3, axis=0).sum(0) * 2
    observed = np.bincount(np.concatenate([data.y[0].ravel(), data.ref_y[0].ravel()]), minlength=4)
    stat = ((observed - expected) ** 2 / expected).sum()
    assert stat < chi2.ppf(1 - 1e-4, df=3)


def test_exact_reference_weights() -> None:
    scenario = Scenario.from_spec({"reference": {"policy": "softmax"}, "K": 3})
    data = sample(scenario, 4, seed=0, M="exact", unlabelled=2, aux="oracle")
    assert data.n_ref == 6 * 9
    phi = scenario.phi(np.concatenate([data.x, data.x_unlabelled], axis=1))
    pi = scenario.reference.probs(phi)[0]
    w = data.ref_weight[0].reshape(6, 9)
    np.testing.assert_allclose(w, (pi[:, :, None] * pi[:, None, :]).reshape(6, 9) / 6)
    np.testing.assert_array_equal(data.ref_row, np.repeat(np.arange(6), 9))


@pytest.mark.parametrize("spec", [{"d": 3, "K": 4, "features": {"map": "tanh"}},  # K > prompt dimension
                                  {"d": 2, "K": 5, "features": {"map": "linear"}}])
def test_noisy_and_random_models_have_their_noise_for_any_K(spec: dict) -> None:
    # over N prompts, the logit error of each ordered pair a != b is N(0, noise^2); pairs sharing no
    # response are uncorrelated; `random` is uncorrelated with g* pair by pair. Sample sds are within
    # 5 relative standard errors (1 / sqrt(2N)), correlations within 5 / sqrt(N).
    sc = Scenario.from_spec(spec)
    N = 20_000
    x = sc.prompts(np.random.default_rng(4), (N,))
    phi = sc.phi(x)
    gs = sc.g_star_matrix(x, phi)
    a, b = np.triu_indices(sc.K, 1)
    err = (logit(build_aux(sc, AuxSpec("noisy_oracle", noise=1.5)).matrix(x, phi)) - logit(gs))[:, a, b]
    assert np.abs(err.std(0) / 1.5 - 1).max() < 5 / math.sqrt(2 * N), err.std(0)
    disjoint = [(i, j) for i in range(len(a)) for j in range(len(a)) if not {a[i], b[i]} & {a[j], b[j]}]
    corr = np.corrcoef(err.T)
    assert disjoint and max(abs(corr[i, j]) for i, j in disjoint) < 5 / math.sqrt(N)
    rnd = logit(build_aux(sc, AuxSpec("random", scale=2.0)).matrix(x, phi))[:, a, b]
    assert np.abs(rnd.std(0) / 2.0 - 1).max() < 5 / math.sqrt(2 * N)
    lg = logit(gs)[:, a, b]
    assert max(abs(np.corrcoef(rnd[:, k], lg[:, k])[0, 1]) for k in range(len(a))) < 5 / math.sqrt(N)


def test_auxiliary_models() -> None:
    scenario = get_scenario("probit")
    base = sample(scenario, 4000, seed=1, M=1, aux=None)
    gs = base.g_star
    np.testing.assert_allclose(base.with_aux("reversed").g_hat, 1 - gs)
    np.testing.assert_array_equal(base.with_aux({"kind": "constant", "value": 0.3}).g_hat, 0.3)
    noisy = base.with_aux({"kind": "noisy_oracle", "noise": 0.8})
    distinct = base.y[..., 0] != base.y[..., 1]
    # pairs whose g* rounds to 0 or 1 (a probit margin beyond 8 sd) have no finite logit to perturb
    distinct &= (gs > 0) & (gs < 1)
    err = logit(noisy.g_hat[distinct]) - logit(gs[distinct])
    # logit error = 0.8 (eta_a - eta_b)/sqrt 2 ~ N(0, 0.64) exactly (eta i.i.d. N(0, 1) over responses):
    # the sample sd of ~3000 draws is within 5% (its relative se is 1/sqrt(2 * 3000) = 1.3%)
    assert np.std(err) == pytest.approx(0.8, rel=0.05) and abs(np.mean(err)) < 4 * 0.8 / math.sqrt(err.size)
    rnd = base.with_aux("random")
    assert abs(np.corrcoef(logit(rnd.g_hat[distinct]), logit(gs[distinct]))[0, 1]) < 0.1
    plug = base.with_aux({"kind": "bt_plugin", "n_fit": 2000})
    # a BT fit of a probit link recovers the ranking (not the link shape): rank correlation near 1
    assert spearmanr(plug.g_hat[distinct], gs[distinct]).statistic > 0.99
    # g_hat on reference pairs uses the same function as on labelled pairs
    same = sample(scenario, 50, seed=3, M="exact", aux="noisy_oracle")
    ref = same.ref_g_hat[0].reshape(50, 16)
    lab_idx = same.y[0, :, 0] * 4 + same.y[0, :, 1]
    np.testing.assert_allclose(ref[np.arange(50), lab_idx], same.g_hat[0])


def test_learned_auxiliary_model_is_cross_fitted() -> None:
    data = sample(get_scenario("near_deterministic"), 600, seed=0, M=2, aux={"kind": "learned", "folds": 3})
    assert data.aux.kind == "learned"
    distinct = data.y[0, :, 0] != data.y[0, :, 1]
    # informative: far better than a coin at predicting g*
    assert np.mean((data.g_hat[0] - data.g_star[0])[distinct] ** 2) < 0.5 * np.mean((0.5 - data.g_star[0]) ** 2)
    # cross-fitted: flipping one row's label leaves its own prediction unchanged
    from robust_rlhf.theory.crossfit import crossfit_predict

    lab, ref = data.pair_features()
    z = data.z[0].astype(float)
    g1, _ = crossfit_predict(lab[0], z, ref[0], data.ref_row, folds=3, seed=5)
    z2 = z.copy()
    z2[0] = 1 - z2[0]
    g2, _ = crossfit_predict(lab[0], z2, ref[0], data.ref_row, folds=3, seed=5)
    assert g1[0] == g2[0] and not np.array_equal(g1, g2)


def test_aux_spec_validation() -> None:
    assert set(AUX_MODELS) == {"oracle", "noisy_oracle", "constant", "reversed", "random", "bt_plugin", "learned"}
    with pytest.raises(SpecError, match="auxiliary model 'bogus' is unknown; allowed: oracle"):
        AuxSpec("bogus")
    with pytest.raises(SpecError, match=r"field 'value' = 1.5 must be in \[0, 1\]"):
        AuxSpec("constant", value=1.5)
    with pytest.raises(SpecError, match="unknown auxiliary model field 'nois'"):
        AuxSpec.parse({"kind": "noisy_oracle", "nois": 1})


@pytest.mark.parametrize("kwargs,match", [
    ({"n": 0}, r"'n' = 0 must be an integer >= 1"), ({"n": -5}, "'n' = -5"), ({"n": 2.5}, "'n' = 2.5"),
    ({"n": 5, "reps": 0}, "'reps' = 0"), ({"n": 5, "M": -1}, "'M' = -1"), ({"n": 5, "M": "all"}, "'M' = 'all'"),
    ({"n": 5, "M": 0, "unlabelled": 3}, "need reference pairs"), ({"n": 5, "seed": -1}, "'seed' = -1"),
    ({"n": 5, "namespace": "foo"}, "namespace 'foo' is unknown; allowed: data, auxiliary"),
])
def test_bad_sampling_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        sample(get_scenario("bt"), **kwargs)


def test_sample_takes_a_scenario_or_its_name() -> None:
    by_name, built = sample("label_flip", 30, seed=4, M=2), sample(get_scenario("label_flip"), 30, seed=4, M=2)
    np.testing.assert_array_equal(by_name.z, built.z)
    with pytest.raises(SpecError, match="unknown scenario 'nope'"):
        sample("nope", 10)
    with pytest.raises(SpecError, match="scenario: expected a Scenario or a registered name, got int"):
        sample(3, 10)
    for seed in (-1, 1.5, True):
        with pytest.raises(SpecError, match="population seed must be an integer >= 0"):
            get_scenario("bt").population(size=10, seed=seed)


def test_seeds_are_32_bit_words() -> None:
    """A seed of 2**32 or more spilled into the next word of the SeedSequence key: data seed s + 2**32 drew
    the prompts and labels of auxiliary seed s. Every seed is refused outside [0, 2**32)."""
    from robust_rlhf.simulate.dataset import sample_population
    from robust_rlhf.simulate.study import StudySpec

    big = 2**32
    sc = get_scenario("bt")
    ok = sample(sc, 5, seed=big - 1, M=0, aux=None)  # the largest seed is allowed
    assert ok.z.shape == (1, 5)
    pop = sc.population(size=10, seed=0)
    for call in (lambda: sample(sc, 5, seed=big, M=0, aux=None), lambda: sample_population(pop, 5, seed=big),
                 lambda: sample_population(pop, 5, seed=-1)):
        with pytest.raises(SpecError, match=r"'seed' = -?\d+ must be an integer in \[0, 2\*\*32\)"):
            call()
    with pytest.raises(SpecError, match=r"auxiliary model field 'seed' = 4294967296 must be an integer in \[0, 2"):
        AuxSpec("noisy_oracle", seed=big)
    with pytest.raises(SpecError, match=r"field 'structure_seed' = 4294967296 must be an integer in \[0, 2"):
        get_scenario("bt", structure_seed=big)
    with pytest.raises(SpecError, match=r"study field 'seed' = 4294967296 must be an integer in \[0, 2"):
        StudySpec.from_dict({"scenarios": ["bt"], "n": [100], "estimators": ["mle"], "seed": big})


def test_separable_bt_plugin_sample_is_named() -> None:
    """The bt_plugin model's own small fit sample can be separable: the error names the auxiliary model and
    n_fit (it was the fitting engine's message about the user's replications and a --bound option)."""
    failures = 0
    for seed in range(8):
        try:
            sample("near_deterministic", 20, seed=0, aux={"kind": "bt_plugin", "n_fit": 10, "seed": seed})
        except SpecError as exc:
            assert "auxiliary model bt_plugin: its own fit sample of n_fit = 10 labelled pairs" in str(exc)
            failures += 1
    assert failures > 0


def test_save_npz_round_trip(tmp_path) -> None:
    data = sample(get_scenario("label_flip"), 40, seed=0, M=3, unlabelled=5, aux="noisy_oracle")
    path = save(data, tmp_path / "d.npz")
    loaded = load_pair_data(path)
    ref = data.to_pair_data()
    for key in ("dphi", "z", "g", "dphi_ref", "g_ref", "ref_weight", "ref_row"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(ref, key))
    meta = json.loads(str(np.load(path)["metadata"]))
    assert meta["scenario"]["preference"]["eps"] == 0.2 and meta["M"] == 3 and meta["aux"]["kind"] == "noisy_oracle"
    assert not list(tmp_path.glob(".*tmp"))


def test_data_without_an_auxiliary_model(tmp_path) -> None:
    """Without ``g_hat`` the reference pairs are kept, without ``g``/``g_ref`` (the data of cross-fitted
    VRPO), in memory and in ``.npz``; ``g_hat`` without reference pairs is not written (the file could not be
    read back: ``g`` alone is no VRPO data set)."""
    from robust_rlhf.theory import fit

    data = sample(get_scenario("bt"), 60, seed=0, M=2, aux=None)
    pairs = data.to_pair_data()
    assert pairs.g is None and pairs.g_ref is None and pairs.n_ref == 120
    loaded = load_pair_data(save(data, tmp_path / "a.npz"))
    for key in ("dphi", "z", "dphi_ref", "ref_weight", "ref_row"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(pairs, key))
    assert loaded.g is None and loaded.g_ref is None
    np.testing.assert_array_equal(fit(loaded, "vrpo_crossfit", folds=3).theta, fit(pairs, "vrpo_crossfit", folds=3).theta)
    alone_mle = fit(PairData(dphi=pairs.dphi, z=pairs.z), "mle")  # the MLE does not read the reference pairs
    np.testing.assert_array_equal(fit(pairs, "mle").theta, alone_mle.theta)
    alone = load_pair_data(save(sample(get_scenario("bt"), 20, seed=0, M=0, aux="oracle"), tmp_path / "b.npz"))
    assert alone.g is None and alone.dphi_ref is None


def test_save_parquet(tmp_path) -> None:
    data = sample(get_scenario("bt"), 10, seed=0, M=2, aux="oracle")
    path = save(data, tmp_path / "d.parquet")
    table = pq.read_table(path)
    frame = table.to_pandas()
    assert (frame.kind == "labelled").sum() == 10 and (frame.kind == "reference").sum() == 20
    lab = frame[frame.kind == "labelled"]
    np.testing.assert_allclose(lab[["dphi_0", "dphi_1", "dphi_2"]].to_numpy(), data.dphi[0])
    assert frame[frame.kind == "reference"].z.isna().all()
    assert json.loads(table.schema.metadata[b"robust_rlhf"])["n"] == 10
    with pytest.raises(SpecError, match="must end in .npz or .parquet"):
        save(data, tmp_path / "d.csv")
    assert isinstance(frame, pd.DataFrame)


def test_exact_design_is_merged_without_changing_the_estimates() -> None:
    """(a, b) and (b, a) give the same term under an antisymmetric g_hat, and every (a, a) the constant
    l(0): the merged design has K(K-1)/2 + 1 pairs per prompt and identical fits and covariances."""
    from robust_rlhf.theory.data import PairData
    from robust_rlhf.theory.fitting import fit

    data = sample(get_scenario("intransitive"), 200, seed=0, reps=2, M="exact", unlabelled=10, aux="noisy_oracle")
    merged = data.to_pair_data()
    full = PairData(dphi=data.dphi, z=data.z.astype(float), g=data.g_hat, dphi_ref=data.dphi_ref,
                    g_ref=data.ref_g_hat, ref_weight=data.ref_weight, ref_row=data.ref_row)
    assert merged.n_ref == 210 * 7 and full.n_ref == 210 * 16
    for method in ("vrpo", "vrpo_tuned"):
        a, b = fit(merged, method), fit(full, method)
        np.testing.assert_allclose(a.theta, b.theta, atol=1e-12)
        np.testing.assert_allclose(a.cov, b.cov, rtol=1e-10)
    # a position-biased judge is not antisymmetric: nothing is merged
    assert sample(get_scenario("position_bias"), 20, seed=0, M="exact").to_pair_data().n_ref == 20 * 16


def test_population_sampling_checks_the_shape_of_g_hat() -> None:
    from robust_rlhf.simulate.dataset import sample_population

    pop = get_scenario("bt").population(30, seed=0)
    P, K = pop.pi.shape
    ok = sample_population(pop, 20, M=2, g_hat=np.full((P, K, K), 0.5))
    assert ok.g_ref.shape == (1, 40)
    for shape in ((P + 10, K, K), (P, K + 1, K + 1), (P, K, 7), (K, K)):
        with pytest.raises(SpecError, match=rf"g_hat must have the population's shape \(P, K, K\) = \({P}, {K}, {K}\)"):
            sample_population(pop, 20, M=2, g_hat=np.full(shape, 0.5))
    bare = sample_population(pop, 20, M=2)  # reference pairs for cross-fitting: the same draws, no g_hat
    assert bare.g is None and bare.g_ref is None
    np.testing.assert_array_equal(bare.dphi_ref, ok.dphi_ref)


def test_summary_counts_disagreement_only_on_opposite_sides() -> None:
    """``ghat_disagreement``: g_hat and g* on different sides of 1/2. A constant g_hat = 1/2 takes no side
    (it scored 1, as the reversed model does)."""
    from robust_rlhf.simulate.summary import summarize

    sc = get_scenario("probit")
    shares = {}
    for aux in ("oracle", "constant", "reversed"):
        data = sample(sc, n=300, seed=1, M=1, aux=aux)
        out = summarize(data, population_size=2000)
        shares[aux] = out["ghat_disagreement"]
        assert out["label_balance"] == pytest.approx(data.z.mean()) and out["mean_g_star"] == pytest.approx(
            data.g_star.mean())
        assert out["ghat_mae"] == pytest.approx(np.abs(data.g_hat - data.g_star).mean())
    assert shares == {"oracle": 0.0, "constant": 0.0, "reversed": 1.0}


def test_data_generators_never_repeat_the_scenarios_structure() -> None:
    """SeedSequence pads entropy with zeros: the data's [seed, 0, 0] with spawn key (3, prompts) was the
    structure's generator of the preference model (entropy seed, spawn key (3, 0)), so replication 3's first
    prompt was the near_deterministic direction (or the intransitive G, the annotators' xi)."""
    from robust_rlhf.simulate.dataset import _NAMESPACES, STREAMS, _rng
    from robust_rlhf.simulate.scenario import _COMPONENT, structure_rng

    def first(g: np.random.Generator) -> tuple[int, ...]:
        return tuple(g.integers(0, 2**62, 4).tolist())

    structure = {first(structure_rng(seed, c, *extra)) for seed in (0, 5) for c in _COMPONENT
                 for extra in ((), (0,), (1,), (0, 0), (0, 1), (1, 1))}
    data = {first(_rng(seed, ns, rep, stream, extra)) for seed in (0, 5) for ns in _NAMESPACES for rep in range(8)
            for stream in STREAMS for extra in (0, 1)}
    assert len(data) == 2 * len(_NAMESPACES) * 8 * len(STREAMS) * 2 and not structure & data
    nd = get_scenario("near_deterministic")
    x = sample(nd, n=1, seed=nd.spec["structure_seed"], reps=6, M=0, aux=None).x[:, 0]
    cosine = x @ nd.preference.direction / np.linalg.norm(x, axis=1)
    assert np.abs(cosine).max() < 0.999  # replication 3's prompt was the direction v itself, scaled
