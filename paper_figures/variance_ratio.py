"""Predicted against measured variance ratio over the MLE, one point per cell with its 95% CI.

Reads the default validation study (`robust-rlhf validate`; run here if missing) and writes
paper_figures/output/variance_ratio.{png,pdf,csv}.
"""

from _common import figure_main

if __name__ == "__main__":
    figure_main("variance_ratio", __doc__)
