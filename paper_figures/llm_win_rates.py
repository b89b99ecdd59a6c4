"""Win rate of every method over DPO and over the reference policy, per misspecification, with 95%
intervals across seeds (the LLM experiment, default results/llm/tiny-cpu; run if missing).

Writes paper_figures/output/llm_win_rates.{png,pdf,csv}.
"""

from robust_rlhf.llm.synthetic.plots import figure_main

if __name__ == "__main__":
    figure_main("llm_win_rates", __doc__, __file__)
