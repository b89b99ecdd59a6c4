"""The LLM experiment's results table: win rates over DPO and the reference, mean true reward and KL,
with 95% intervals across seeds (default results/llm/tiny-cpu; run if missing).

Writes paper_figures/output/llm_results_table.{png,pdf,csv}.
"""

from robust_rlhf.llm.synthetic.plots import figure_main

if __name__ == "__main__":
    figure_main("llm_results_table", __doc__, __file__)
