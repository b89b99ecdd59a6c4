r"""Preference data: the column format, loading, row validation and the position-bias fix.

Format (TRL's explicit-prompt preference format plus VRPO's columns):

* ``prompt``: a string, or a list of chat messages ``{"role": ..., "content": ...}``;
* ``chosen``, ``rejected``: strings, or lists of (assistant) messages; ``chosen`` is the winner, so the
  label of every labelled pair is ``Z = 1``;
* reference responses ``a_1, a_2, ..., a_{2M}`` drawn from ``pi_ref(.|prompt)``: reference pair ``j``
  (1-based) is ``(a_{2j-1}, a_{2j})``, so ``a_1, a_2`` is the authors' single pair and ``a_3, a_4``,
  ``a_5, a_6``, ... add pairs; every row has the same number ``M`` of pairs;
* auxiliary probabilities ``chosen_preference = g_hat(x, chosen, rejected)``,
  ``rejected_preference = g_hat(x, rejected, chosen)``, and ``a_k_preference`` = probability that
  ``a_k`` beats the other response of its pair. The two probabilities of a pair must sum to 1
  (within ``tol``); ``symmetrize_preferences`` replaces a position-biased pair ``(p, q)`` by
  ``((p + 1 - q) / 2, (q + 1 - p) / 2)``.

Rows are numbered from 1 in the order the data set holds them (for JSONL: the n-th JSON record,
blank lines not counted). Nothing here imports transformers; ``datasets`` is imported only to load
Parquet/Arrow folders or hub names and to build the returned ``datasets.Dataset``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robust_rlhf.theory.errors import InputError

__all__ = [
    "PROMPT",
    "CHOSEN",
    "REJECTED",
    "CHOSEN_PREF",
    "REJECTED_PREF",
    "DEFAULT_TOL",
    "PreferenceSchema",
    "RowProblem",
    "reference_column",
    "preference_column",
    "as_response",
    "infer_schema",
    "row_problems",
    "check_rows",
    "symmetrize_preferences",
    "read_rows",
    "load_preference_data",
    "prepare_rows",
    "rows_to_dataset",
    "summary",
    "write_jsonl",
]

PROMPT = "prompt"
CHOSEN = "chosen"
REJECTED = "rejected"
CHOSEN_PREF = "chosen_preference"
REJECTED_PREF = "rejected_preference"
#: dataset column holding the reference policy's log-probabilities of the K responses of a row (the trainer's)
REF_LOGPS = "ref_logps"
#: default tolerance on ``|p + q - 1|`` for the two probabilities of a pair
DEFAULT_TOL = 1e-3

_REF_RE = re.compile(r"^a_([1-9][0-9]*)$")
_REF_PREF_RE = re.compile(r"^a_([1-9][0-9]*)_preference$")


def reference_column(k: int) -> str:
    """Name of the ``k``-th reference response column (1-based): ``a_k``."""
    return f"a_{k}"


def as_response(prompt: Any, text: str) -> Any:
    """A generated text as a response of ``prompt``'s row: an assistant message for a chat prompt, else the text."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def preference_column(response_column: str) -> str:
    """Name of the probability column of a response column: ``chosen_preference``, ``a_3_preference``."""
    return f"{response_column}_preference"


@dataclass(frozen=True)
class PreferenceSchema:
    """What a data set holds: ``n_ref_pairs`` reference pairs per row and which probability columns."""

    n_ref_pairs: int = 0
    #: ``chosen_preference``/``rejected_preference`` present
    labelled_preferences: bool = False
    #: ``a_k_preference`` present for every reference response
    reference_preferences: bool = False

    @property
    def reference_columns(self) -> list[str]:
        """``a_1 ... a_{2M}``."""
        return [reference_column(k) for k in range(1, 2 * self.n_ref_pairs + 1)]

    @property
    def reference_pairs(self) -> list[tuple[str, str]]:
        """``[(a_1, a_2), (a_3, a_4), ...]``."""
        cols = self.reference_columns
        return [(cols[2 * j], cols[2 * j + 1]) for j in range(self.n_ref_pairs)]

    @property
    def response_columns(self) -> list[str]:
        """``chosen, rejected, a_1, ..., a_{2M}``: the order of the concatenated forward pass."""
        return [CHOSEN, REJECTED, *self.reference_columns]

    @property
    def has_preferences(self) -> bool:
        """Whether the data carries ``g_hat`` on both the labelled and the reference pairs."""
        return self.labelled_preferences and (self.reference_preferences or self.n_ref_pairs == 0)

    @property
    def preference_columns(self) -> list[str]:
        """Probability columns this schema holds."""
        cols: list[str] = []
        if self.labelled_preferences:
            cols += [CHOSEN_PREF, REJECTED_PREF]
        if self.reference_preferences:
            cols += [preference_column(c) for c in self.reference_columns]
        return cols


def infer_schema(columns: Iterable[str]) -> PreferenceSchema:
    """Read the schema from column names; raise ``InputError`` on a malformed set of columns.

    Required: ``prompt``, ``chosen``, ``rejected``. Reference columns must be ``a_1 .. a_{2M}`` with no
    gap and an even count; probability columns come in pairs and, for references, for every ``a_k``.
    """
    cols = set(columns)
    if REF_LOGPS in cols:
        raise InputError(f"column {REF_LOGPS} is reserved for the reference log-probabilities that the trainer "
                         "computes (or reads from its cache); drop or rename it in the data")
    missing = [c for c in (PROMPT, CHOSEN, REJECTED) if c not in cols]
    if missing:
        raise InputError(
            f"missing column(s) {', '.join(missing)}: preference data needs explicit 'prompt', 'chosen' and "
            f"'rejected' columns (found: {', '.join(sorted(cols)) or 'none'})"
        )
    odd = sorted(c for c in cols if re.fullmatch(r"a_[0-9]+(_preference)?", c) and not (_REF_RE.match(c)
                                                                                      or _REF_PREF_RE.match(c)))
    if odd:
        raise InputError(f"column(s) {', '.join(odd)}: reference columns are numbered from 1 without leading zeros "
                         "(a_1 .. a_2M, a_k_preference)")
    ref_idx = sorted(int(m.group(1)) for c in cols if (m := _REF_RE.match(c)))
    if ref_idx != list(range(1, len(ref_idx) + 1)):
        raise InputError(f"reference columns must be a_1 .. a_2M without gaps, found a_{ref_idx}")
    if len(ref_idx) % 2:
        raise InputError(
            f"reference columns come in pairs (a_1, a_2), (a_3, a_4), ...; found an odd count {len(ref_idx)}"
        )
    n_pairs = len(ref_idx) // 2
    has_c, has_r = CHOSEN_PREF in cols, REJECTED_PREF in cols
    if has_c != has_r:
        raise InputError(
            f"column {CHOSEN_PREF if has_r else REJECTED_PREF} is missing: the labelled pair's probabilities "
            f"{CHOSEN_PREF} and {REJECTED_PREF} come together"
        )
    pref_idx = sorted(int(m.group(1)) for c in cols if (m := _REF_PREF_RE.match(c)))
    if pref_idx and pref_idx != ref_idx:
        missing_p = sorted(set(ref_idx) - set(pref_idx))
        extra_p = sorted(set(pref_idx) - set(ref_idx))
        what = []
        if missing_p:
            what.append("missing " + ", ".join(preference_column(reference_column(k)) for k in missing_p))
        if extra_p:
            what.append("no response column for " + ", ".join(preference_column(reference_column(k)) for k in extra_p))
        raise InputError("reference probability columns do not match the reference responses: " + "; ".join(what))
    if pref_idx and not has_c:
        raise InputError(
            f"reference probabilities a_k_preference are given but {CHOSEN_PREF}/{REJECTED_PREF} are not: "
            "the control variate needs g_hat on the labelled pair too"
        )
    return PreferenceSchema(n_ref_pairs=n_pairs, labelled_preferences=has_c, reference_preferences=bool(pref_idx))


@dataclass(frozen=True)
class RowProblem:
    """One bad field: ``row`` is 1-based."""

    row: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"row {self.row}, field '{self.field}': {self.message}"


def _text_problem(value: Any, *, is_prompt: bool) -> str | None:
    """Why ``value`` is not a usable prompt/response (None if it is)."""
    if value is None:
        return "missing (null)"
    if isinstance(value, str):
        return "empty" if not value.strip() else None
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return "empty message list"
        for i, msg in enumerate(value):
            if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
                return f"message {i + 1} is not a {{'role', 'content'}} mapping"
            if not isinstance(msg["role"], str) or not msg["role"]:
                return f"message {i + 1} has no role"
            if not isinstance(msg["content"], str) or not msg["content"].strip():
                return f"message {i + 1} has empty content"
        if not is_prompt and any(m["role"] != "assistant" for m in value):
            return "a response's messages must all have role 'assistant' (the prompt holds the other turns)"
        return None
    return f"must be a string or a list of chat messages, got {type(value).__name__}"


def _prob_problem(value: Any) -> str | None:
    if value is None:
        return "missing (null)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number in [0, 1], got {value!r}"
    if math.isnan(value):
        return "is NaN"
    if not 0.0 <= value <= 1.0:
        return f"is {value!r}, outside [0, 1]"
    return None


def _pairs_with_probabilities(schema: PreferenceSchema) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    if schema.labelled_preferences:
        pairs.append((CHOSEN, REJECTED))
    if schema.reference_preferences:
        pairs += schema.reference_pairs
    return pairs


def row_problems(
    row: Mapping[str, Any], index: int, schema: PreferenceSchema, tol: float = DEFAULT_TOL
) -> list[RowProblem]:
    """Every problem of one row (``index`` is 0-based; reported rows are 1-based)."""
    out: list[RowProblem] = []
    rnum = index + 1
    conversational: dict[str, bool] = {}
    for col in (PROMPT, *schema.response_columns):
        value = row.get(col)
        why = _text_problem(value, is_prompt=col == PROMPT)
        if why is not None:
            out.append(RowProblem(rnum, col, why))
        else:
            conversational[col] = not isinstance(value, str)
    kinds = set(conversational.values())
    if len(kinds) > 1:
        plain = sorted(c for c, v in conversational.items() if not v)
        chat = sorted(c for c, v in conversational.items() if v)
        out.append(RowProblem(rnum, ", ".join(plain), f"plain strings mixed with chat messages (in {', '.join(chat)})"))
    elif conversational.get(PROMPT) and isinstance(row.get(PROMPT), (list, tuple)):
        if row[PROMPT][-1].get("role") == "assistant":
            out.append(RowProblem(rnum, PROMPT, "a chat prompt must not end with an assistant message"))
    if not (tol >= 0 and math.isfinite(tol)):
        raise InputError(f"tol must be a finite number >= 0, got {tol}")
    for first, second in _pairs_with_probabilities(schema):
        pf, ps = preference_column(first), preference_column(second)
        p, q = row.get(pf), row.get(ps)
        bad_p, bad_q = _prob_problem(p), _prob_problem(q)
        if bad_p:
            out.append(RowProblem(rnum, pf, bad_p))
        if bad_q:
            out.append(RowProblem(rnum, ps, bad_q))
        if not bad_p and not bad_q and abs(p + q - 1.0) > tol:
            out.append(
                RowProblem(
                    rnum,
                    f"{pf}+{ps}",
                    f"{p!r} + {q!r} = {p + q!r} is not 1 (tolerance {tol}); "
                    "for a position-biased judge use the symmetrising fix (--fix)",
                )
            )
    return out


def check_rows(
    rows: Iterable[Mapping[str, Any]], schema: PreferenceSchema, tol: float = DEFAULT_TOL, max_report: int = 20
) -> None:
    """Validate every row; raise one ``InputError`` listing up to ``max_report`` problems (row and field)."""
    problems: list[RowProblem] = []
    count = 0
    for i, row in enumerate(rows):
        found = row_problems(row, i, schema, tol)
        count += len(found)
        problems.extend(found[: max(0, max_report - len(problems))])
    if count:
        more = f" (and {count - len(problems)} more)" if count > len(problems) else ""
        raise InputError(f"{count} bad field(s) in the preference data: " + "; ".join(map(str, problems)) + more)


def symmetrize_preferences(row: Mapping[str, Any], schema: PreferenceSchema) -> dict[str, Any]:
    r"""The position-bias fix: each pair's ``(p, q)`` becomes ``(g, 1 - g)`` with ``g = (p + 1 - q) / 2``.

    ``p`` is the judge's probability that the first response wins when shown first and ``q`` that the
    second wins when shown first; their average (after flipping ``q``) cancels an additive position bias.
    Entries that are missing or not numbers are left for validation to report.
    """
    out = dict(row)
    for first, second in _pairs_with_probabilities(schema):
        pf, ps = preference_column(first), preference_column(second)
        p, q = row.get(pf), row.get(ps)
        if _prob_problem(p) is None and _prob_problem(q) is None:
            g = 0.5 * (p + 1.0 - q)
            out[pf], out[ps] = g, 1.0 - g
    return out


# ----------------------------------------------------------------------------------------------
# Loading


def _is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as fh:
        record = 0
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: line {lineno} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            record += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: row {record} (line {lineno}) is not valid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}: row {record} (line {lineno}) is a {type(obj).__name__}, not a JSON object")
            yield obj


def read_rows(source: str | os.PathLike[str], split: str = "train") -> list[dict[str, Any]]:
    """Rows of a data set as plain dicts, before any Arrow typing (so a bad row can still be reported).

    ``source``: a ``.jsonl``/``.json`` file (JSON lines, or one JSON list of objects), a ``.parquet`` file,
    a folder written by ``datasets.save_to_disk`` (a ``DatasetDict`` folder uses ``split``), or, when the
    path does not exist, a hub data set name loaded with ``datasets.load_dataset(source, split=split)``.
    """
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return list(_read_jsonl(path))
        if suffix == ".json":
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                return list(_read_jsonl(path))
            if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
                return obj
            if isinstance(obj, dict):
                return [obj]
            raise InputError(f"{path}: expected JSON lines or a JSON list of objects")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            import pyarrow

            try:
                return pq.read_table(path).to_pylist()
            except (OSError, pyarrow.ArrowException) as exc:
                raise InputError(f"{path}: not a readable parquet file ({exc})") from None
        raise InputError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json or .parquet")
    if path.is_dir():
        if not _is_datasets_folder(path):
            raise InputError(f"{path}: a folder must be one written by datasets' save_to_disk")
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"{path}: split {split!r} not found; available: {', '.join(ds)}")
            ds = ds[split]
        return ds.to_list()
    text = str(source)
    if (
        path.suffix.lower() in (".jsonl", ".json", ".parquet")
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
    ):
        raise FileNotFoundError(2, "no such data file or folder", text)
    import datasets

    try:
        ds = datasets.load_dataset(str(source), split=split)
    except Exception as exc:  # offline, unknown name, ...: one line for the user
        raise InputError(
            f"cannot load {source!r} as a local file or hub data set: {type(exc).__name__}: {exc}"
        ) from None
    return ds.to_list()


def rows_to_dataset(rows: Sequence[Mapping[str, Any]]):
    """A ``datasets.Dataset`` of validated rows."""
    import datasets

    if not rows:
        raise InputError("the preference data has no rows")
    return datasets.Dataset.from_list([dict(r) for r in rows])


def load_preference_data(
    source: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    split: str = "train",
    fix: bool = False,
    tol: float = DEFAULT_TOL,
    require_references: bool = False,
    require_preferences: bool = False,
):
    """Load, (optionally) symmetrise and validate preference data; return ``(dataset, schema)``.

    Every row is checked before anything is trained; the ``InputError`` names the row (1-based) and the
    field. ``require_references`` / ``require_preferences`` additionally demand reference pairs / the
    probability columns (VRPO with ``g_hat`` from the data).
    """
    rows, schema = prepare_rows(source, split, fix, tol, require_references, require_preferences)
    return rows_to_dataset(rows), schema


def prepare_rows(
    source: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    split: str = "train",
    fix: bool = False,
    tol: float = DEFAULT_TOL,
    require_references: bool = False,
    require_preferences: bool = False,
) -> tuple[list[dict[str, Any]], PreferenceSchema]:
    """``load_preference_data`` without building the ``datasets.Dataset``: validated rows and their schema."""
    rows = (
        [dict(r) for r in source]
        if isinstance(source, Sequence) and not isinstance(source, (str, bytes))
        else read_rows(source, split)
    )
    if not rows:
        raise InputError(
            f"{source if isinstance(source, (str, os.PathLike)) else 'data'}: the preference data has no rows"
        )
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    try:  # a problem names its file (train or eval data)
        schema = infer_schema(columns)
        if require_references and schema.n_ref_pairs == 0:
            raise InputError("this method needs reference pairs: columns a_1, a_2 (and a_3, a_4, ... for more pairs)")
        if require_preferences and not schema.has_preferences:
            raise InputError(
                "this method needs g_hat columns chosen_preference, rejected_preference and a_k_preference for "
                "every reference response (or another g_hat source)"
            )
        if fix:
            rows = [symmetrize_preferences(r, schema) for r in rows]
        check_rows(rows, schema, tol)
    except InputError as exc:
        if not isinstance(source, (str, os.PathLike)):
            raise
        raise InputError(f"{source}: {exc}") from None
    return rows, schema


def summary(rows: Sequence[Mapping[str, Any]], schema: PreferenceSchema) -> dict[str, Any]:
    """Counts a good file's summary prints: rows, reference pairs per row, probability columns, format."""
    first = rows[0] if rows else {}
    return {
        "rows": len(rows),
        "reference_pairs_per_row": schema.n_ref_pairs,
        "labelled_preferences": schema.labelled_preferences,
        "reference_preferences": schema.reference_preferences,
        "format": "conversational" if isinstance(first.get(PROMPT), (list, tuple)) else "plain text",
    }


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str], append: bool = False) -> None:
    """Write rows as JSON lines (``append`` adds to an existing file; missing folders are made); flushed and
    synced to disk."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
