"""pytest plugin of the property-testing kit: the ``check_estimator`` and ``check_objective`` fixtures.

Registered through the ``pytest11`` entry point of the package, so installing ``robust-rlhf`` (with
its ``test`` extra) is enough::

    def test_my_estimator(check_estimator):
        check_estimator(my_fit)               # the full battery; fails the test with the report

    def test_my_loss(check_objective):
        check_objective(my_objective, properties=["control_variate", "swap_invariance"])

Both fixtures take the keyword options of ``simulate.properties.check_estimator`` /
``check_objective`` and return the ``BatteryResult`` when every check passes. Command-line options:
``--kit-seed N`` (the seed of every check, default 0) and ``--kit-design quick|full`` (the Monte
Carlo design: ``Design()`` or ``Design.full()``). The hypothesis searches follow the active
hypothesis profile (``HYPOTHESIS_PROFILE``). Without the entry point (a source checkout that is not
installed), enable it with ``-p robust_rlhf.simulate.pytest_plugin``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["make_checker"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("robust-rlhf", "robust-rlhf property-testing kit")
    group.addoption("--kit-seed", type=int, default=0, dest="kit_seed",
                    help="seed of every property check of the check_estimator/check_objective fixtures (default 0)")
    group.addoption("--kit-design", choices=("quick", "full"), default="quick", dest="kit_design",
                    help="Monte Carlo design of the fixtures: quick (Design(), the CI default) or full (Design.full())")


def make_checker(kind: str, seed: int = 0, design: str = "quick") -> Callable[..., Any]:
    """The callable behind a fixture: runs the battery of ``kind`` (``estimator`` or ``objective``) and
    fails the calling test, with the report, when a check fails."""
    from . import properties

    if kind not in ("estimator", "objective"):
        raise ValueError(f"kind must be 'estimator' or 'objective', got {kind!r}")

    def check(subject: Callable[..., Any], **options: Any) -> properties.BatteryResult:
        options.setdefault("seed", seed)
        if kind == "estimator":
            if design == "full" and "design" not in options:
                options["design"] = properties.Design.full(seed=options["seed"])
            result = properties.check_estimator(subject, **options)
        else:
            result = properties.check_objective(subject, **options)
        if not result.passed:
            pytest.fail(result.report(), pytrace=False)
        return result

    return check


@pytest.fixture
def check_estimator(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``check_estimator(fit_fn, **options)``: the estimator battery; fails the test on a failed check."""
    return make_checker("estimator", request.config.getoption("kit_seed"), request.config.getoption("kit_design"))


@pytest.fixture
def check_objective(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``check_objective(objective_fn, **options)``: the objective battery; fails the test on a failed check."""
    return make_checker("objective", request.config.getoption("kit_seed"))
