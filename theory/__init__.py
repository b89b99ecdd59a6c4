"""theory: the estimators' mathematics.

- ``losses``: margin losses, the soft-labelled pair loss and the VR objective (shared with ``llm``);
- ``data``: what the estimators consume (``PairData``, ``PairPopulation``); ``io``: reading ``.npz`` data;
- ``fitting``: MLE, VRPO, power-tuned and cross-fitted VRPO on a leading replication axis (``crossfit``:
  the cross-fitted auxiliary models ``g_hat``, and DRPO's ``g_hat`` and reference model ``pi_hat``);
- ``asymptotics``: population targets, exact asymptotic covariances and second-order biases;
  ``second_order``: the O(1/n) term of the covariance;
- ``policies`` and ``bounds``: policies from a reward estimate, regret, predictions and bounds;
- ``drpo``: DRPO, a policy fitted to a doubly robust estimate of its win rate (reference policy unknown);
- ``symbolic``: sympy derivations of the key formulas;
- ``kernels``: the compiled loops behind ``fitting`` and ``theta_regret`` (C++ built on first use; each
  has a torch path that gives the same numbers).
"""

import importlib

# Public names and their modules, imported on first access (PEP 562): ``import robust_rlhf.theory.errors``
# or ``theory.data`` does not pull in torch, cvxpy and sympy, so the commands' ``--help`` starts at once.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "asymptotics": ("AsymptoticCovariance", "LambdaChoice", "Target", "VarianceRatio", "bread", "mle_covariance",
                    "optimal_lambda", "population_target", "tuned_bias", "variance_ratio", "vr_bias",
                    "vr_covariance"),
    "second_order": ("vr_second_order",),
    "data": ("PairData", "PairPopulation"),
    "drpo": ("DRPOData", "DRPOFit", "DRPOSampledLoss", "DRPOTarget", "dr_win_rate", "drpo_sampled_loss", "drpo_target",
             "fit_drpo"),
    "errors": ("InputError", "SeparableDataError"),
    "fitting": ("METHODS", "FitResult", "fit"),
    "io": ("load_pair_data",),
    "losses": ("LOSSES", "Hinge", "Logistic", "MarginLoss", "Squared", "TruncatedHinge", "get_loss", "pair_loss",
               "robust_pair_loss", "vr_derivatives", "vr_objective", "vr_terms"),
    "policies": ("greedy_policy", "kl_policy", "optimal_policy", "pessimistic_policy", "preference_gap", "regret",
                 "theta_regret", "value"),
    "bounds": ("estimation_radius", "gaussian_plugin_regret", "kl_regret_delta_method", "pessimistic_regret_bound"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


_SUBMODULES = frozenset(_EXPORTS) | {"crossfit", "kernels", "symbolic"}  # the modules that export no names here


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:  # ``theory.fitting`` after ``import robust_rlhf.theory``
        return importlib.import_module(f".{name}", __name__)
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
