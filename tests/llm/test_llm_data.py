"""Data format, loading and row validation (llm.data); tokenisation and batches (llm.tokenization)."""

from __future__ import annotations

import json
import math

import pytest

from robust_rlhf.llm.data import (
    PreferenceSchema,
    check_rows,
    infer_schema,
    load_preference_data,
    read_rows,
    row_problems,
    symmetrize_preferences,
)
from robust_rlhf.theory.errors import InputError

from llm_helpers import make_rows


def test_infer_schema_reference_pairs_and_preferences() -> None:
    s = infer_schema(["prompt", "chosen", "rejected"])
    assert s == PreferenceSchema(0, False, False) and not s.has_preferences
    cols = ["prompt", "chosen", "rejected", "a_1", "a_2", "a_3", "a_4", "chosen_preference", "rejected_preference"]
    cols += [f"a_{k}_preference" for k in range(1, 5)]
    s = infer_schema(cols)
    assert s.n_ref_pairs == 2 and s.has_preferences
    assert s.reference_pairs == [("a_1", "a_2"), ("a_3", "a_4")]
    assert s.response_columns == ["chosen", "rejected", "a_1", "a_2", "a_3", "a_4"]


@pytest.mark.parametrize(
    "cols, match",
    [
        (["chosen", "rejected"], "missing column"),
        (["prompt", "chosen", "rejected", "a_1"], "pairs"),
        (["prompt", "chosen", "rejected", "a_1", "a_3"], "without gaps"),
        (["prompt", "chosen", "rejected", "chosen_preference"], "rejected_preference is missing"),
        (
            [
                "prompt",
                "chosen",
                "rejected",
                "a_1",
                "a_2",
                "chosen_preference",
                "rejected_preference",
                "a_1_preference",
            ],
            "missing a_2_preference",
        ),
        (["prompt", "chosen", "rejected", "a_1", "a_2", "a_1_preference", "a_2_preference"], "labelled pair too"),
        # the trainer's own column: a user's values were taken as pi_ref's log-probs unchecked
        (["prompt", "chosen", "rejected", "ref_logps"], "column ref_logps is reserved"),
        # a_0 was taken for an unrelated column and dropped without a word
        (["prompt", "chosen", "rejected", "a_0", "a_1", "a_2"], r"column\(s\) a_0: reference columns are numbered "
                                                              "from 1"),
        (["prompt", "chosen", "rejected", "a_01", "a_02", "a_01_preference"], "a_01, a_01_preference, a_02"),
    ],
)
def test_infer_schema_rejects_malformed_columns(cols: list[str], match: str) -> None:
    with pytest.raises(InputError, match=match):
        infer_schema(cols)


def test_bad_rows_name_the_row_and_field() -> None:
    rows = make_rows(6, n_pairs=1, seed=1)
    rows[1]["chosen"] = "   "
    rows[2]["a_2_preference"] = float("nan")
    rows[3]["chosen_preference"] = 1.2
    rows[4]["rejected_preference"] = rows[4]["chosen_preference"]  # sums to 2p != 1
    rows[4]["chosen_preference"] = 0.8
    rows[4]["rejected_preference"] = 0.3
    del rows[5]["a_1"]
    schema = infer_schema(rows[0].keys())
    problems = [p for i, r in enumerate(rows) for p in row_problems(r, i, schema)]
    found = {(p.row, p.field) for p in problems}
    assert (2, "chosen") in found
    assert (3, "a_2_preference") in found
    assert (4, "chosen_preference") in found
    assert (5, "chosen_preference+rejected_preference") in found
    assert (6, "a_1") in found
    assert not any(p.row == 1 for p in problems)
    with pytest.raises(InputError) as err:
        check_rows(rows, schema)
    msg = str(err.value)
    assert "row 2, field 'chosen': empty" in msg and "row 3, field 'a_2_preference': is NaN" in msg
    assert "row 6, field 'a_1': missing" in msg


def test_chat_rows_are_checked() -> None:
    rows = make_rows(3, n_pairs=1, seed=2, chat=True)
    schema = infer_schema(rows[0].keys())
    assert [p for i, r in enumerate(rows) for p in row_problems(r, i, schema)] == []
    rows[0]["rejected"] = "plain text"  # mixed formats
    rows[1]["chosen"] = [{"role": "user", "content": "hi"}]  # a response must be assistant turns
    rows[2]["prompt"] = [{"role": "user"}]  # no content
    probs = {(p.row, p.field) for i, r in enumerate(rows) for p in row_problems(r, i, schema)}
    assert (1, "rejected") in probs and (2, "chosen") in probs and (3, "prompt") in probs


def test_symmetrize_fixes_position_bias() -> None:
    row = make_rows(1, n_pairs=1, seed=0)[0]
    row["chosen_preference"], row["rejected_preference"] = 0.9, 0.3  # judge favours the first position
    row["a_1_preference"], row["a_2_preference"] = 0.6, 0.6
    schema = infer_schema(row.keys())
    assert row_problems(row, 0, schema)  # sums 1.2
    fixed = symmetrize_preferences(row, schema)
    assert fixed["chosen_preference"] == pytest.approx(0.8) and fixed["rejected_preference"] == pytest.approx(0.2)
    assert fixed["a_1_preference"] == pytest.approx(0.5) and fixed["a_2_preference"] == pytest.approx(0.5)
    assert row_problems(fixed, 0, schema) == []
    # symmetric pairs are unchanged
    again = symmetrize_preferences(fixed, schema)
    assert again["chosen_preference"] == pytest.approx(0.8)


def test_load_jsonl_parquet_and_folder(tmp_path) -> None:
    rows = make_rows(5, n_pairs=2, seed=3)
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds, schema = load_preference_data(jl, require_references=True, require_preferences=True)
    assert len(ds) == 5 and schema.n_ref_pairs == 2
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds2, _ = load_preference_data(tmp_path / "d.parquet")
    assert ds2.to_list() == ds.to_list()
    ds.save_to_disk(str(tmp_path / "folder"))
    ds3, _ = load_preference_data(tmp_path / "folder")
    assert ds3.to_list() == ds.to_list()
    assert read_rows(jl)[4]["prompt"] == rows[4]["prompt"]


def test_load_errors(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = make_rows(2, seed=4)
    bad.write_text(json.dumps(good[0]) + "\n{not json\n")
    with pytest.raises(InputError, match="row 2 \\(line 2\\) is not valid JSON"):
        read_rows(bad)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes((json.dumps(good[0]) + "\n").encode() + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(InputError, match="latin.jsonl: line 2 is not UTF-8 text"):
        read_rows(latin)
    latin_json = tmp_path / "latin.json"  # a raw UnicodeDecodeError
    latin_json.write_bytes(b'[{"prompt": "caf\xe9"}]')
    with pytest.raises(InputError, match="latin.json: not UTF-8 text"):
        read_rows(latin_json)
    cut = tmp_path / "cut.parquet"
    import pandas as pd

    pd.DataFrame(good).to_parquet(cut)
    cut.write_bytes(cut.read_bytes()[:-40])
    with pytest.raises(InputError, match="cut.parquet: not a readable parquet file"):
        read_rows(cut)
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing.jsonl")
    nan = tmp_path / "nan.jsonl"
    good[1]["rejected_preference"] = math.nan
    nan.write_text("\n".join(json.dumps(r) for r in good))
    with pytest.raises(InputError, match="row 2, field 'rejected_preference': is NaN"):
        load_preference_data(nan)
    no_refs = make_rows(2, n_pairs=0, seed=5)
    with pytest.raises(InputError, match="reference pairs"):
        load_preference_data(no_refs, require_references=True)
    no_pref = make_rows(2, n_pairs=1, seed=5, preferences=False)
    with pytest.raises(InputError, match="g_hat columns"):
        load_preference_data(no_pref, require_preferences=True)


def test_tokenise_and_collate(tokenizer) -> None:
    from robust_rlhf.llm.tokenization import (
        REF_LOGPS,
        PreferenceCollator,
        TokenizeOptions,
        render_example,
        tokenize_dataset,
        tokenize_example,
    )

    rows = make_rows(3, n_pairs=2, seed=6)
    ds, schema = load_preference_data(rows)
    tds = tokenize_dataset(ds, tokenizer, schema, TokenizeOptions(max_completion_length=4))
    assert set(tds.column_names) == {f"{c}_input_ids" for c in ["prompt", *schema.response_columns]} | set(
        schema.preference_columns
    )
    ex = tds[0]
    assert ex["prompt_input_ids"][0] == tokenizer.bos_token_id
    assert all(len(ex[f"{c}_input_ids"]) <= 4 for c in schema.response_columns)
    batch = PreferenceCollator(tokenizer.pad_token_id, schema)([tds[i] for i in range(3)])
    K, B = 6, 3
    assert batch["input_ids"].shape[0] == K * B
    assert batch["g"].tolist() == pytest.approx([r["chosen_preference"] for r in rows])
    assert batch["ref_g"][:, 1].tolist() == pytest.approx([r["a_3_preference"] for r in rows])
    # sequence k * B + i is response k of row i; its completion mask covers exactly the response
    for k, col in enumerate(schema.response_columns):
        for i in range(B):
            r = k * B + i
            p = len(tds[i]["prompt_input_ids"])
            resp = tds[i][f"{col}_input_ids"]
            assert batch["input_ids"][r, p : p + len(resp)].tolist() == resp
            assert batch["completion_mask"][r].sum().item() == len(resp)
            assert batch["attention_mask"][r].sum().item() == p + len(resp)
    assert REF_LOGPS not in batch
    # truncation keeps the prompt's end and its BOS (the BOS was cut off with the start)
    from robust_rlhf.llm.tokenization import prompt_token_ids

    text = " ".join(tokenizer.convert_ids_to_tokens(tds[0]["prompt_input_ids"][1:]))
    full = prompt_token_ids(text, tokenizer, TokenizeOptions())
    assert full[0] == tokenizer.bos_token_id and len(full) > 3
    for limit in (3, 2, 1):
        cut = prompt_token_ids(text, tokenizer, TokenizeOptions(max_prompt_length=limit))
        assert cut == [tokenizer.bos_token_id] + full[len(full) - limit + 1 :]
    # chat rows: the response is what the assistant turn adds to the template
    chat = make_rows(1, n_pairs=1, seed=7, chat=True)[0]
    prompt_text, (chosen_text, *_) = render_example(chat, tokenizer, ["chosen", "rejected", "a_1", "a_2"])
    assert prompt_text.endswith("<s> assistant : ")
    # a template that refuses a role (raise_exception, as Gemma's does for "system"): a raw TemplateError
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role "
                            "not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    system = {**chat, "prompt": [{"role": "system", "content": "be brief"}, *chat["prompt"]]}
    with pytest.raises(InputError, match=r"chat template refused messages with roles \['system', 'user'\]: "
                                         r"TemplateError: System role not supported"):
        render_example(system, strict, ["chosen"])
    assert chosen_text == chat["chosen"][0]["content"] + " </s> "
    t = tokenize_example(chat, tokenizer, ["chosen"], TokenizeOptions())
    assert t["chosen_input_ids"].count(tokenizer.eos_token_id) == 1  # the template's EOS, not a second one


def test_light_modules_do_not_import_transformers() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import robust_rlhf.llm, robust_rlhf.llm.data, robust_rlhf.llm.objectives; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "from robust_rlhf.llm import PreferenceObjective; print(PreferenceObjective.from_names('vrpo').method)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "vrpo"
