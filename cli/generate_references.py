"""``robust-rlhf generate-references``: sample M reference pairs per prompt from the reference policy."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from . import _json

NAME = "generate-references"
HELP = "sample reference pairs a_1 .. a_2M per prompt from pi_ref (resumable)"
DESCRIPTION = """\
Sample M reference pairs (2M responses, columns a_1 .. a_2M) for every prompt of a data file from
the reference policy, with batched `generate` (or vLLM's offline batch generation with
--backend vllm/auto when it is installed), and write the rows plus the new columns as JSONL.

Resumable: the output grows one batch at a time; run the same command again after an interruption
and it continues after the last complete batch (same --batch-size), giving the same file as an
uninterrupted run. Settings come from --config (YAML with the keys n_pairs, max_new_tokens,
min_new_tokens, temperature, top_p, top_k, batch_size, seed, max_prompt_length, backend) and the flags."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="reference policy: hub name or local folder (safetensors)")
    parser.add_argument(
        "--data", required=True, help="input rows with a 'prompt' column (JSONL, Parquet, folder, hub name)"
    )
    parser.add_argument("--output", required=True, help="output JSONL file")
    parser.add_argument("--config", help="YAML file of generation settings")
    parser.add_argument("--split", default="train")
    parser.add_argument("--pairs", type=int, dest="n_pairs", help="reference pairs M per prompt")
    parser.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    parser.add_argument("--min-new-tokens", type=int, dest="min_new_tokens")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float, dest="top_p")
    parser.add_argument("--top-k", type=int, dest="top_k")
    parser.add_argument("--batch-size", type=int, dest="batch_size")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-prompt-length", type=int, dest="max_prompt_length")
    parser.add_argument("--backend", choices=["transformers", "vllm", "auto"])
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--no-resume", action="store_true", help="start the output afresh")
    parser.add_argument("--max-batches", type=int, help="stop after this many new batches (a partial run)")


def run(args: argparse.Namespace) -> int:
    import torch

    from robust_rlhf.llm.config import _load_yaml
    from robust_rlhf.llm.data import read_rows
    from robust_rlhf.llm.models import load_causal_lm, load_tokenizer
    from robust_rlhf.llm.references import GenerationOptions, generate_references, vllm_available
    from robust_rlhf.theory.errors import InputError

    settings = _load_yaml(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(GenerationOptions)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise InputError(
            f"{args.config}: unknown generation setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
        )
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    options = GenerationOptions(**settings)
    if Path(args.data).exists() and Path(args.output).resolve() == Path(args.data).resolve():
        raise InputError(f"--output {args.output} is the --data file: give another output file (the input is kept)")
    rows = read_rows(args.data, args.split)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = None
    if not (options.backend == "vllm" or (options.backend == "auto" and vllm_available())):
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_causal_lm(args.model, args.dtype, trust_remote_code=args.trust_remote_code).to(device)
    done = generate_references(
        rows,
        args.output,
        options,
        model=model,
        tokenizer=tokenizer,
        model_path=args.model,
        resume=not args.no_resume,
        max_batches=args.max_batches,
    )
    print(
        _json.dumps(
            {
                "output": args.output,
                "rows_written": done,
                "rows": len(rows),
                "complete": done == len(rows),
                "reference_pairs_per_row": options.n_pairs,
            }
        )
    )
    return 0
