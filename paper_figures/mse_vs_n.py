"""MSE of every estimator against n (log-log), with 95% bands, the predicted tr(cov)/n and a slope -1 guide.

Reads the default validation study (`robust-rlhf validate`; run here if missing) and writes
paper_figures/output/mse_vs_n.{png,pdf,csv}.
"""

from _common import figure_main

if __name__ == "__main__":
    figure_main("mse_vs_n", __doc__)
