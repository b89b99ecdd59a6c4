"""Coverage of the nominal 95% sandwich confidence intervals against n.

Reads the default validation study (`robust-rlhf validate`; run here if missing) and writes
paper_figures/output/coverage_vs_n.{png,pdf,csv}.
"""

from _common import figure_main

if __name__ == "__main__":
    figure_main("coverage_vs_n", __doc__)
