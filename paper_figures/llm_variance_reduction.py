"""VRPO's training diagnostics: per-row gradient variance with the control variate over without it, and
the mean lambda, per method and misspecification (the LLM experiment, default results/llm/tiny-cpu).

Writes paper_figures/output/llm_variance_reduction.{png,pdf,csv}.
"""

from robust_rlhf.llm.synthetic.plots import figure_main

if __name__ == "__main__":
    figure_main("llm_variance_reduction", __doc__, __file__)
