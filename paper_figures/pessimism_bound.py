"""The explicit regret bound of the pessimistic policy against n, with the largest possible regret,
the regret of the policy the bound certifies and of the asymptotic-ellipsoid pessimistic policy.

Reads the default validation study (`robust-rlhf validate`; run here if missing) and writes
paper_figures/output/pessimism_bound.{png,pdf,csv}.
"""

from _common import figure_main

if __name__ == "__main__":
    figure_main("pessimism_bound", __doc__)
