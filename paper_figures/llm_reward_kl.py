"""Mean true reward against KL to the reference, one panel per misspecification, with 95% intervals
across seeds (the LLM experiment, default results/llm/tiny-cpu; run if missing).

Writes paper_figures/output/llm_reward_kl.{png,pdf,csv}.
"""

from robust_rlhf.llm.synthetic.plots import figure_main

if __name__ == "__main__":
    figure_main("llm_reward_kl", __doc__, __file__)
