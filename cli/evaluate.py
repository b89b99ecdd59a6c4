"""``robust-rlhf evaluate``: win rate of one policy over another on held-out prompts, under a judge."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import _json

NAME = "evaluate"
HELP = "win rate of a policy over a baseline under a judge, with its 95 percent interval, mean true reward and KL"
DESCRIPTION = """\
Sample one response per prompt from POLICY and from BASELINE (independent seeds, temperature 1),
show each pair to a judge in a random order, and report the win rate of POLICY (ties count 1/2) with a
95% interval (Wilson or bootstrap), the soft win probability, the mean true reward of both (when a true
reward exists) and the KL of both to the reference policy (default: the baseline).

Judges:
  oracle        g*(x, a, b) of a synthetic scenario on a true reward (--scenario, --reward); drawn from
  true-reward   deterministic comparison of the true reward (--reward); ties when equal
  reward-model  sigmoid(r(x, a) - r(x, b)) of a one-output sequence classifier (--judge-model); argmax
  callable      f(prompt, a, b) -> P(a wins) (--judge-callable module:function); drawn from

examples:
  robust-rlhf evaluate --policy runs/vrpo --baseline runs/dpo --reference ref/ --prompts eval.jsonl \\
      --judge oracle --scenario annotator_mixture --reward vader --json
  robust-rlhf evaluate --policy runs/vrpo --baseline ref/ --prompts eval.txt --judge reward-model \\
      --judge-model rm/ --ci bootstrap"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="policy folder or hub name (causal LM + tokenizer)")
    p.add_argument("--baseline", required=True, help="baseline policy folder or hub name")
    p.add_argument("--reference", default=None, help="reference policy for the KL (default: the baseline)")
    p.add_argument("--prompts", required=True, type=Path,
                   help="held-out prompts: .txt (one per line) or .jsonl/.json/.parquet with a 'prompt' field")
    p.add_argument("--judge", default="oracle", help="oracle, true-reward, reward-model or callable (default oracle)")
    p.add_argument("--scenario", default=None, help="oracle judge: a text scenario (bt, annotator_mixture, ...)")
    p.add_argument("--sharpness", type=float, default=4.0, help="oracle judge: margin per unit of true reward")
    p.add_argument("--reward", default=None,
                   help="true reward: vader[:fields], classifier:PATH[@LABEL] or module:function (default vader "
                        "for the oracle and true-reward judges)")
    p.add_argument("--judge-model", default=None, help="reward-model judge: its folder or hub name")
    p.add_argument("--judge-callable", default=None, help="callable judge: module:function (prompt, a, b) -> P(a wins)")
    p.add_argument("--decision", default=None, help="sample (draw from the judge's probability) or argmax")
    p.add_argument("--ci", default="wilson", help="wilson or bootstrap (default wilson)")
    p.add_argument("--n", type=int, default=None, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=Path, default=None, help="write the prompts, both responses and outcomes (JSONL)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _prompts(path: Path, n: int | None) -> list:
    from robust_rlhf.llm.data import read_rows
    from robust_rlhf.theory.errors import InputError

    if not path.is_file():
        raise InputError(f"--prompts: no file {str(path)!r}")
    if path.suffix == ".txt":
        prompts: list = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = read_rows(path)
        missing = [i + 1 for i, r in enumerate(rows) if not r.get("prompt")]
        if missing:
            raise InputError(f"{path}: row {missing[0]} has no 'prompt'")
        prompts = [r["prompt"] for r in rows]
    if not prompts:
        raise InputError(f"{path}: no prompts")
    if n is not None:
        if n < 1:
            raise InputError(f"--n must be >= 1, got {n}")
        prompts = prompts[:n]
    return prompts


def run(args: argparse.Namespace) -> int:
    from robust_rlhf.theory.errors import InputError

    judge_name = args.judge.replace("_", "-")
    from robust_rlhf.llm.evaluate import CI_METHODS, DECISIONS, JUDGES

    if judge_name not in JUDGES:
        raise InputError(f"--judge: unknown {args.judge!r}; allowed: {', '.join(JUDGES)}")
    if args.ci not in CI_METHODS:
        raise InputError(f"--ci: unknown {args.ci!r}; allowed: {', '.join(CI_METHODS)}")
    if args.decision is not None and args.decision not in DECISIONS:
        raise InputError(f"--decision: unknown {args.decision!r}; allowed: {', '.join(DECISIONS)}")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise InputError("--max-new-tokens and --batch-size must be >= 1")
    if judge_name == "oracle" and not args.scenario:
        raise InputError("--judge oracle needs --scenario (bt, annotator_mixture, label_flip, ...)")
    if judge_name == "reward-model" and not args.judge_model:
        raise InputError("--judge reward-model needs --judge-model PATH")
    if judge_name == "callable" and not args.judge_callable:
        raise InputError("--judge callable needs --judge-callable module:function")
    if args.samples is not None and (args.samples.is_dir() or not args.samples.parent.is_dir()):
        # checked before the sampling and judging, which would otherwise be lost
        raise InputError(f"--samples {args.samples}: " + ("is a folder" if args.samples.is_dir()
                                                           else f"its folder {args.samples.parent} does not exist"))
    prompts = _prompts(args.prompts, args.n)

    import torch

    from robust_rlhf.theory.io import load_callable
    from robust_rlhf.llm.evaluate import build_judge, evaluate_policies
    from robust_rlhf.llm.models import load_causal_lm, load_reward_model, load_tokenizer
    from robust_rlhf.llm.references import GenerationOptions
    from robust_rlhf.llm.synthetic.reward import get_reward

    reward_spec = args.reward or ("vader" if judge_name in ("oracle", "true-reward") else None)
    reward = get_reward(reward_spec) if reward_spec else None
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def load(path: str) -> tuple:
        return load_causal_lm(path).to(device), load_tokenizer(path)

    import transformers

    transformers.utils.logging.disable_progress_bar()  # one line per error, none per weight file
    policy = load(args.policy)
    baseline = load(args.baseline)
    reference = load(args.reference) if args.reference else None
    judge_model = judge_tok = None
    if judge_name == "reward-model":
        judge_tok = load_tokenizer(args.judge_model)
        judge_model = load_reward_model(args.judge_model, judge_tok.pad_token_id).to(device)
    judge = build_judge(
        judge_name,
        scenario=args.scenario,
        sharpness=args.sharpness,
        reward=reward,
        judge_model=judge_model,
        judge_tokenizer=judge_tok,
        judge_callable=load_callable(args.judge_callable, name="--judge-callable") if args.judge_callable else None,
    )
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, top_k=0)
    result = evaluate_policies(
        policy, baseline, prompts, judge, reference=reference, reward=reward, options=options, seed=args.seed,
        ci=args.ci, decision=args.decision,
    )
    samples = result.pop("samples")
    result.update({"policy": args.policy, "baseline": args.baseline, "reference": args.reference or args.baseline,
                   "prompts": str(args.prompts), "seed": args.seed, "reward": reward_spec})
    if args.samples:
        from robust_rlhf.llm.data import write_jsonl

        keys = ("prompts", "policy", "baseline", "outcome", "soft")
        write_jsonl([dict(zip(keys, row)) for row in zip(*(samples[k] for k in keys))], args.samples)
    if args.json:
        print(_json.dumps(result))
        return 0
    pct = int(round(result["level"] * 100))
    print(f"win rate of {args.policy} over {args.baseline} ({result['judge']}, {result['decision']}, n={result['n']}):")
    print(f"  {result['win_rate']:.3f}  {pct}% CI [{result['ci_low']:.3f}, {result['ci_high']:.3f}] ({result['ci_method']})"
          f"  wins {result['wins']}, ties {result['ties']}, losses {result['losses']}")
    print(f"  soft win probability {result['soft']:.3f} [{result['soft_ci_low']:.3f}, {result['soft_ci_high']:.3f}]")
    if result["mean_reward"] is not None:
        print(f"  mean true reward: policy {result['mean_reward']:+.3f} [{result['mean_reward_ci_low']:+.3f}, "
              f"{result['mean_reward_ci_high']:+.3f}], baseline {result['baseline_mean_reward']:+.3f}")
    print(f"  KL to the reference: policy {result['kl']:.3f} [{result['kl_ci_low']:.3f}, {result['kl_ci_high']:.3f}], "
          f"baseline {result['baseline_kl']:.3f}")
    return 0
