"""The synthetic sentiment task: LLM experiments end to end on a CPU, with a true reward.

* ``corpus``: offline text (Debian fortunes, or generated sentences) and prompt prefixes;
* ``tokenizer``, ``reference_model``: a byte-level BPE and a tiny GPT-2 pre-trained on the corpus, cached;
* ``reward``: true rewards (VADER, a sentiment classifier, a callable) as reward components ``phi``;
* ``scenarios``: the preference models of ``simulate.preferences`` on ``phi`` (BT, probit, mixture, flips, ...);
* ``presets``, ``experiment``: configured runs of every method, resumable, with evaluation;
* ``report``, ``plots``: across-seed summaries, the Markdown report and the figures.
"""

from __future__ import annotations
