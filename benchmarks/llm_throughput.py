r"""Training throughput of the one-stage trainer (``PreferenceTrainer``) against TRL's ``DPOTrainer``.

    pip install -e ".[llm,bench]"              # TRL, pinned, used only here
    python benchmarks/llm_throughput.py        # CPU: a tiny GPT-2 from a config (a few minutes)
    python benchmarks/llm_throughput.py --device cuda --model qwen0.5b --dtype bfloat16 --attn sdpa \
        --batch-size 8 --rows 256 --max-len 512 --peak-tflops 989   # a GPU, MFU printed

The same freshly initialised model (same seed), the same rows, batch size, optimiser and schedule for
every configuration:

* ``ours_dpo``: ``PreferenceTrainer``, method ``mle`` with the logistic loss (DPO); our trainer scores a
  batch in up to ``--length-groups`` forward passes over sequences of similar length (its default, 4;
  ``--length-groups 1`` for one padded pass, as TRL does);
* ``ours_vrpo_M1`` / ``ours_vrpo_M4``: method ``vrpo`` (lam = 1) with M = 1 / 4 reference pairs per
  row and ``g_hat`` from the data's preference columns;
* ``trl_dpo``: TRL's ``DPOTrainer`` (sigmoid loss) with ``precompute_ref_log_probs=True``, the same
  setting as ours (reference log-probs computed once before training, no reference model held);
* ``trl_dpo_live_ref``: TRL's default, a reference model run at every step.

Each configuration trains one epoch (``--rows / --batch-size`` steps), ``--runs`` times with the order
rotated from run to run; the figures are medians. Time is measured from ``on_train_begin`` to
``on_train_end``. What comes before training, tokenisation and the reference model's pass, is timed
separately as ``ref_pass_s`` (both trainers tokenise in it: TRL's constructor does, so ours is timed from
the same point).
Tokens are the non-padding tokens the policy processes: for every sequence scored, prompt plus
response (a DPO row scores 2 sequences, VRPO with M pairs ``2 + 2M``). ``us_per_token`` is the time per
processed token; ``ratio_to_trl`` = tokens/s over ``trl_dpo``'s, each trainer counting the tokens of its
own tokenisation of the same texts (they differ by the special tokens each adds), and
``pairs_ratio_to_trl`` = pairs/s over ``trl_dpo``'s (the same rows: the like-for-like ratio for DPO).
Peak memory is the peak of the heap in use (glibc ``mallinfo2``, sampled every 5 ms) above its level at
``on_train_begin`` (CPU), or ``torch.cuda.max_memory_allocated`` above it (GPU).
MFU (GPU only): ``6 N tokens/s / peak``, ``N`` the parameters a token multiplies by (``flop_parameters``: all
but the input embeddings, the output head included when tied; the usual forward plus backward estimate;
attention's ``O(L^2)`` term ignored: state the sequence length with it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from typing import Any

from _util import PeakMemory, load_average, load_before_timing

WORDS = (
    "the a cat dog sky sun moon is was blue green red hot cold big small very not and or it this that what color "
    "where why how good bad yes no maybe today night day sea tree bird fish runs sleeps eats river stone light dark "
    "fast slow over under near far old new warm cool soft hard loud quiet open close up down left right"
).split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def make_tokenizer() -> Any:
    """A word-level fast tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def make_model(kind: str, tokenizer: Any, seed: int, dtype: str, attn: str, max_len: int) -> Any:
    """``tiny``: GPT-2, 4 layers of width 128; ``qwen0.5b``: a Qwen2 config of about 0.5B parameters
    (24 layers, width 896, the Qwen2.5-0.5B shapes and vocabulary size), randomly initialised."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if kind == "tiny":
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=max(max_len, 256), n_embd=128, n_layer=4, n_head=4,
                         **ids)
        cls = GPT2LMHeadModel
    elif kind == "qwen0.5b":
        cfg = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=max(max_len, 2048),
                          tie_word_embeddings=True, **ids)
        cls = Qwen2ForCausalLM
    else:
        raise SystemExit(f"unknown --model {kind!r} (tiny, qwen0.5b)")
    cfg._attn_implementation = attn
    model = cls(cfg)
    return model.to(getattr(torch, dtype))


def make_rows(n: int, n_pairs: int, seed: int, prompt_len: tuple[int, int], resp_len: tuple[int, int]) -> list[dict]:
    rng = random.Random(seed)

    def sentence(lo_hi: tuple[int, int]) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lo_hi)))

    rows = []
    for _ in range(n):
        # responses start with a space: TRL joins prompt + response as text, which must not merge the
        # prompt's last word with the response's first (ours tokenizes them apart: the space is dropped)
        row: dict[str, Any] = {"prompt": sentence(prompt_len), "chosen": " " + sentence(resp_len),
                               "rejected": " " + sentence(resp_len)}
        p = round(rng.uniform(0.05, 0.95), 3)
        row["chosen_preference"], row["rejected_preference"] = p, round(1 - p, 3)
        for j in range(n_pairs):
            row[f"a_{2 * j + 1}"], row[f"a_{2 * j + 2}"] = " " + sentence(resp_len), " " + sentence(resp_len)
            q = round(rng.uniform(0.05, 0.95), 3)
            row[f"a_{2 * j + 1}_preference"], row[f"a_{2 * j + 2}_preference"] = q, round(1 - q, 3)
        rows.append(row)
    return rows


def flop_parameters(model: Any) -> int:
    """The parameters a token's forward pass multiplies by: all but the input embeddings (token and position
    lookups), with the output head's vocabulary x hidden matmul counted also when it shares (is tied to) the
    token embedding, which ``parameters()`` lists once, as the embedding."""
    emb = sum(p.numel() for name, p in model.named_parameters() if "embed" in name or "wte" in name or "wpe" in name)
    n = sum(p.numel() for p in model.parameters()) - emb
    head, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and inputs is not None and head.weight is inputs.weight:
        n += head.weight.numel()
    return n


class _Clock:
    """A TrainerCallback timing on_train_begin -> on_train_end and sampling peak memory in between."""

    def __init__(self, device: str) -> None:
        from transformers import TrainerCallback

        clock = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
                import torch

                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    clock.base_mem = torch.cuda.memory_allocated()
                else:
                    clock.mem = PeakMemory().start()
                clock.t0 = time.perf_counter()

            def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
                import torch

                if device == "cuda":
                    torch.cuda.synchronize()
                    clock.peak = torch.cuda.max_memory_allocated() - clock.base_mem
                else:
                    clock.peak = clock.mem.stop()
                clock.t1 = time.perf_counter()

        self.callback = CB()

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


def _common_args(out: str, a: argparse.Namespace) -> dict[str, Any]:
    return dict(output_dir=out, per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=a.batch_size,
                num_train_epochs=1, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
                save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0, report_to="none",
                dataloader_num_workers=0, use_cpu=a.device == "cpu", bf16=a.dtype == "bfloat16",
                max_grad_norm=1.0)


def _ours_args(out: str, a: argparse.Namespace) -> dict[str, Any]:
    return dict(_common_args(out, a), activation_checkpointing=a.activation_checkpointing)


def run_ours(config: str, a: argparse.Namespace, rows: list[dict], tokenizer: Any) -> dict[str, Any]:
    from robust_rlhf.llm.config import training_arguments
    from robust_rlhf.llm.data import load_preference_data
    from robust_rlhf.llm.objectives import PreferenceObjective
    from robust_rlhf.llm.tokenization import TokenizeOptions, tokenize_dataset
    from robust_rlhf.llm.trainers import PreferenceTrainer

    M = {"ours_dpo": 0, "ours_vrpo_M1": 1, "ours_vrpo_M4": 4}[config]
    keep = ["prompt", "chosen", "rejected", "chosen_preference", "rejected_preference"]
    keep += [f"a_{k}" for k in range(1, 2 * M + 1)] + [f"a_{k}_preference" for k in range(1, 2 * M + 1)]
    ds, schema = load_preference_data([{k: r[k] for k in keep} for r in rows])
    cols = ["chosen", "rejected"] + [f"a_{k}" for k in range(1, 2 * M + 1)]
    objective = PreferenceObjective.from_names("mle" if M == 0 else "vrpo", "logistic", lam=1.0)
    model = make_model(a.model, tokenizer, 0, a.dtype, a.attn, a.max_len).to(a.device)
    clock = _Clock(a.device)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        train = tokenize_dataset(ds, tokenizer, schema, TokenizeOptions(max_completion_length=a.max_len))
        trainer = PreferenceTrainer(model, training_arguments(**_ours_args(out, a)), objective=objective,
                                    schema=schema, beta=0.1, train_dataset=train, processing_class=tokenizer,
                                    length_groups=a.length_groups, callbacks=[clock.callback])
        ref_pass = time.perf_counter() - t
        tokens = sum(len(r["prompt_input_ids"]) * len(cols) + sum(len(r[f"{c}_input_ids"]) for c in cols)
                     for r in train)
        trainer.train()
    return {"seconds": clock.seconds, "tokens": tokens, "rows": len(rows), "peak_bytes": clock.peak,
            "ref_pass_s": ref_pass, "sequences_per_row": len(cols),
            "flop_parameters": flop_parameters(model)}


def run_trl(config: str, a: argparse.Namespace, rows: list[dict], tokenizer: Any) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    model = make_model(a.model, tokenizer, 0, a.dtype, a.attn, a.max_len).to(a.device)
    clock = _Clock(a.device)
    with tempfile.TemporaryDirectory() as out:
        # TRL turns activation checkpointing on by default; ours is off: off for both (same work)
        args = DPOConfig(**_common_args(out, a), beta=0.1, loss_type=["sigmoid"], max_length=None,
                         gradient_checkpointing=a.activation_checkpointing,
                         precompute_ref_log_probs=config == "trl_dpo", remove_unused_columns=False)
        t = time.perf_counter()
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args, train_dataset=ds,
                             processing_class=tokenizer, callbacks=[clock.callback])
        setup = time.perf_counter() - t
        tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                     for r in trainer.train_dataset)
        trainer.train()
    return {"seconds": clock.seconds, "tokens": tokens, "rows": len(rows), "peak_bytes": clock.peak,
            "ref_pass_s": setup, "sequences_per_row": 2, "flop_parameters": flop_parameters(model)}


CONFIGS = ("ours_dpo", "ours_vrpo_M1", "ours_vrpo_M4", "trl_dpo", "trl_dpo_live_ref")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--model", default="tiny", help="tiny (GPT-2, 4 x 128) or qwen0.5b")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (GPU)")
    p.add_argument("--attn", default="sdpa", help="attention implementation: sdpa, eager, flash_attention_2")
    p.add_argument("--rows", type=int, default=64, help="preference rows = one epoch (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-len", default="8,24", help="prompt words, min,max (default 8,24)")
    p.add_argument("--resp-len", default="8,48", help="response words, min,max (default 8,48)")
    p.add_argument("--max-len", type=int, default=256, help="maximum completion tokens")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--length-groups", type=int, default=4,
                   help="our trainer: forward passes per batch over sequences of similar length (default 4, "
                        "the trainer's; 1: one padded pass)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations (both trainers)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak (dense) TFLOP/s for MFU")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    import torch
    import transformers

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; allowed: {', '.join(CONFIGS)}")
    tokenizer = make_tokenizer()
    rows = make_rows(a.rows, 4, 0, tuple(int(x) for x in a.prompt_len.split(",")),
                     tuple(int(x) for x in a.resp_len.split(",")))
    load = load_before_timing()
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    # the trainers print their metrics: keep stdout for the result (one JSON object with --json)
    with contextlib.redirect_stdout(sys.stderr):
        for run in range(a.runs):
            order = configs[run % len(configs):] + configs[:run % len(configs)]
            for c in order:
                fn = run_trl if c.startswith("trl") else run_ours
                results[c].append(fn(c, a, rows, tokenizer))
    table: dict[str, dict[str, Any]] = {}
    for c, runs in results.items():
        secs = statistics.median(r["seconds"] for r in runs)
        tok = runs[0]["tokens"]
        row = {"seconds": secs, "runs_s": [r["seconds"] for r in runs], "tokens": tok,
               "tokens_per_s": tok / secs, "pairs_per_s": runs[0]["rows"] / secs, "us_per_token": 1e6 * secs / tok,
               "peak_memory_mb": statistics.median(r["peak_bytes"] for r in runs) / 2**20,
               "ref_pass_s": statistics.median(r["ref_pass_s"] for r in runs),
               "sequences_per_row": runs[0]["sequences_per_row"]}
        if a.device == "cuda" and a.peak_tflops:
            row["mfu"] = 6 * runs[0]["flop_parameters"] * row["tokens_per_s"] / (a.peak_tflops * 1e12)
        table[c] = row
    trl = table.get("trl_dpo")
    dpo = table.get("ours_dpo")
    for row in table.values():
        if trl:
            row["ratio_to_trl"] = row["tokens_per_s"] / trl["tokens_per_s"]
            row["pairs_ratio_to_trl"] = row["pairs_per_s"] / trl["pairs_per_s"]
            row["memory_ratio_to_trl"] = row["peak_memory_mb"] / max(trl["peak_memory_mb"], 1e-9)
        if dpo:
            row["cost_per_token_vs_our_dpo"] = row["us_per_token"] / dpo["us_per_token"]
    out = {"table": table, "model": a.model, "device": a.device, "dtype": a.dtype, "attn": a.attn, "rows": a.rows,
           "batch_size": a.batch_size, "runs": a.runs, "torch_threads": torch.get_num_threads(),
           "omp_wait_policy": __import__("os").environ.get("OMP_WAIT_POLICY"),
           "load_before": load, "load_after": load_average(),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "trl": __import__("trl").__version__ if any(c.startswith("trl") for c in configs) else None}}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"{a.model} on {a.device} ({a.dtype}, {a.attn}), {a.rows} rows, batch {a.batch_size}, "
          f"{a.runs} runs (median); torch threads {out['torch_threads']}; load {load} -> {out['load_after']}")
    print("| config | tokens/s | pairs/s | us/token | vs our DPO (per token) | tokens/s vs TRL | pairs/s vs TRL | "
          "peak MB | ref pass s |" + (" MFU |" if a.device == "cuda" and a.peak_tflops else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if a.device == "cuda" and a.peak_tflops else ""))
    for c, r in table.items():
        print(f"| {c} | {r['tokens_per_s']:.0f} | {r['pairs_per_s']:.1f} | {r['us_per_token']:.1f} | "
              f"{r.get('cost_per_token_vs_our_dpo', float('nan')):.2f} | {r.get('ratio_to_trl', float('nan')):.2f} | "
              f"{r.get('pairs_ratio_to_trl', float('nan')):.2f} | "
              f"{r['peak_memory_mb']:.0f} | {r['ref_pass_s']:.2f} |"
              + (f" {r['mfu']:.3f} |" if "mfu" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
