"""The mean error n E[theta_hat - theta_dagger] of every estimator against its predicted second-order bias b,
per coordinate, with simultaneous 95% intervals, one panel per scenario.

Reads the default validation study (`robust-rlhf validate`; run here if missing) and writes
paper_figures/output/second_order_bias.{png,pdf,csv}.
"""

from _common import figure_main

if __name__ == "__main__":
    figure_main("second_order_bias", __doc__)
