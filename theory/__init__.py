"""theory: the estimators' mathematics.

- ``losses``: margin losses, the soft-labelled pair loss and the VR objective (shared with ``llm``);
- ``data``: what the estimators consume (``PairData``, ``PairPopulation``); ``io``: reading ``.npz`` data;
- ``fitting``: MLE, VRPO, power-tuned and cross-fitted VRPO on a leading replication axis;
- ``asymptotics``: population targets and exact asymptotic covariances;
- ``policies`` and ``bounds``: policies from a reward estimate, regret, predictions and bounds;
- ``symbolic``: sympy derivations of the key formulas.
"""

from .asymptotics import (
    AsymptoticCovariance,
    LambdaChoice,
    Target,
    VarianceRatio,
    bread,
    mle_covariance,
    optimal_lambda,
    population_target,
    variance_ratio,
    vr_covariance,
)
from .data import PairData, PairPopulation
from .errors import InputError, SeparableDataError
from .fitting import METHODS, FitResult, fit
from .io import load_pair_data
from .losses import (
    LOSSES,
    Hinge,
    Logistic,
    MarginLoss,
    Squared,
    TruncatedHinge,
    get_loss,
    pair_loss,
    robust_pair_loss,
    vr_derivatives,
    vr_objective,
    vr_terms,
)
from .policies import (
    greedy_policy,
    kl_policy,
    optimal_policy,
    pessimistic_policy,
    preference_gap,
    regret,
    theta_regret,
    value,
)
from .bounds import estimation_radius, gaussian_plugin_regret, kl_regret_delta_method, pessimistic_regret_bound
