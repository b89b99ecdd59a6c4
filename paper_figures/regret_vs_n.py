"""Regret of the greedy and KL policies against n, with 95% bands and the Gaussian plug-in prediction.

Reads the default validation study (`robust-rlhf validate`; run here if missing) and writes
paper_figures/output/regret_vs_n.{png,pdf,csv}.
"""

from _common import figure_main

if __name__ == "__main__":
    figure_main("regret_vs_n", __doc__)
