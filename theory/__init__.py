"""theory: the estimators' mathematics (losses, fits, population targets, asymptotics, regret)."""

from .errors import InputError, SeparableDataError
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
    vr_objective,
    vr_terms,
)
