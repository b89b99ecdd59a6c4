"""DRPO's double robustness against n: the distance of its estimate from the oracle policy, its regret in the true
objective and the bias of its win-rate estimate, with g_hat wrong, pi_hat wrong and both.

Reads the default validation study (`robust-rlhf validate`; run here if missing) and writes
paper_figures/output/double_robustness.{png,pdf,csv}.
"""

from _common import figure_main

if __name__ == "__main__":
    figure_main("double_robustness", __doc__)
