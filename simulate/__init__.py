"""simulate: linear-reward preference data under named misspecifications.

>>> from robust_rlhf.simulate import get_scenario, sample
>>> data = sample(get_scenario("probit"), n=500, seed=0, reps=10, M=4, aux="oracle")
>>> data.to_pair_data()  # what robust_rlhf.theory.fit consumes
"""

from .auxiliary import AUX_MODELS, AuxSpec
from .dataset import PreferenceData, sample, save
from .preferences import LINKS, link_function
from .registry import SCENARIOS, get_scenario, scenario_names
from .scenario import PREFERENCE_MODELS, Scenario, SpecError, load_spec

__all__ = [
    "AUX_MODELS", "AuxSpec", "LINKS", "PREFERENCE_MODELS", "PreferenceData", "SCENARIOS", "Scenario",
    "SpecError", "get_scenario", "link_function", "load_spec", "sample", "save", "scenario_names",
]
