"""Worker of the two-process DDP test: trains a tiny policy and writes its log and a weight digest.

Run as ``torchrun --nproc_per_node N ddp_worker.py OUT.json PER_DEVICE_BATCH`` (or plainly with N = 1).
"""

from __future__ import annotations

import json
import os
import sys

import torch

torch.set_num_threads(1)

from llm_helpers import make_causal_lm, make_rows, make_tokenizer  # noqa: E402

from robust_rlhf.llm.config import training_arguments  # noqa: E402
from robust_rlhf.llm.data import load_preference_data  # noqa: E402
from robust_rlhf.llm.objectives import PreferenceObjective  # noqa: E402
from robust_rlhf.llm.tokenization import TokenizeOptions, tokenize_dataset  # noqa: E402
from robust_rlhf.llm.trainers import PreferenceTrainer  # noqa: E402


def main(out: str, per_device: int, output_dir: str) -> None:
    tok = make_tokenizer()
    ds, schema = load_preference_data(make_rows(16, n_pairs=2, seed=30))
    tds = tokenize_dataset(ds, tok, schema, TokenizeOptions())
    args = training_arguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        max_steps=3,
        learning_rate=1e-2,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        report_to="none",
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        lr_scheduler_type="constant",
    )
    trainer = PreferenceTrainer(
        make_causal_lm(tok, seed=0),
        args,
        objective=PreferenceObjective.from_names("vrpo_tuned", lambda_target="loss"),
        schema=schema,
        beta=0.5,
        ref_model=make_causal_lm(tok, seed=3),
        train_dataset=tds,
        processing_class=tok,
    )
    trainer.train()
    if trainer.is_world_process_zero():
        digest = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
        logs = [h for h in trainer.state.log_history if "loss" in h]
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "logs": logs,
                    "digest": digest,
                    "world_size": trainer.args.world_size,
                    "ref_logps": list(trainer.train_dataset["ref_logps"]),
                },
                fh,
            )


def main_drpo(out: str, per_device: int, output_dir: str) -> None:
    """Two DRPO steps; every process writes its weight digest and logs to ``OUT.<rank>``."""
    from llm_helpers import oracle_g

    from robust_rlhf.llm.auxiliary import CallableScorer
    from robust_rlhf.llm.drpo import DRPOTrainer

    tok = make_tokenizer()
    ds, schema = load_preference_data(make_rows(8, n_pairs=0, seed=31, preferences=False))
    tds = tokenize_dataset(ds, tok, schema, TokenizeOptions(), keep_text=True)
    args = training_arguments(output_dir=output_dir, per_device_train_batch_size=per_device, max_steps=2,
                              learning_rate=1e-2, use_cpu=True, save_strategy="no", logging_steps=1,
                              disable_tqdm=True, seed=0, report_to="none", lr_scheduler_type="constant",
                              ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
    trainer = DRPOTrainer(make_causal_lm(tok, seed=0), args, schema=schema, scorer=CallableScorer(oracle_g),
                          beta=0.3, samples=2, max_new_tokens=4, train_dataset=tds, processing_class=tok)
    trainer.train()
    digest = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    with open(f"{out}.{trainer.args.process_index}", "w", encoding="utf-8") as fh:
        json.dump({"logs": logs, "digest": digest, "world_size": trainer.args.world_size}, fh)


if __name__ == "__main__":
    from accelerate import PartialState

    (main_drpo if sys.argv[4:] == ["drpo"] else main)(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    PartialState().destroy_process_group()  # as cli/finetune.py does: no gloo teardown race at exit
