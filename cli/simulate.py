"""``robust-rlhf simulate``: draw a preference data set from a named or custom scenario."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import _json

NAME = "simulate"
HELP = "draw preference data under a named misspecification"
DESCRIPTION = """\
Draw a preference data set from a scenario and write it to a file.

Each labelled row is a prompt x ~ N(0, I), two responses drawn from the reference policy, and a
label Z ~ Bernoulli(g*(x, y1, y2)) from the scenario's preference model. Reference pairs (M per
prompt, or all K x K pairs with --M exact) and the auxiliary model g_hat are added for VRPO.
An .npz output is what `robust-rlhf fit --data FILE` reads; a .parquet output is the tidy table of
the same draws (one row per pair, labelled and reference, told apart by its `kind` column, for
analysis elsewhere).

examples:
  robust-rlhf simulate --list
  robust-rlhf simulate --describe probit
  robust-rlhf simulate --scenario probit --n 1000 --seed 0 --M 4 --out probit.npz
  robust-rlhf simulate --spec my_scenario.yaml --aux noisy_oracle:noise=0.5 --json"""

DEFAULT_SCENARIO = "annotator_mixture"


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group()
    what.add_argument("--scenario", default=None, metavar="NAME",
                      help=f"registered scenario (default: {DEFAULT_SCENARIO}; see --list)")
    what.add_argument("--spec", type=Path, default=None, metavar="FILE",
                      help="custom scenario from a YAML or JSON spec (fields: see --describe)")
    what.add_argument("--list", action="store_true", help="list the registered scenarios and exit")
    what.add_argument("--describe", metavar="NAME", help="print a scenario's process and full spec, then exit")
    p.add_argument("--n", type=int, default=1000, help="labelled pairs (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="data seed; the same seed gives identical data (default: 0)")
    p.add_argument("--M", default="4", metavar="M",
                   help="reference pairs per prompt, 0 for none, or 'exact' for all K x K pairs (default: 4)")
    p.add_argument("--unlabelled", type=int, default=0, metavar="N",
                   help="extra unlabelled prompts carrying reference pairs (default: 0)")
    p.add_argument("--aux", default="oracle", metavar="KIND[:k=v,...]",
                   help="auxiliary model g_hat: oracle, noisy_oracle, constant, reversed, random, bt_plugin, "
                        "learned, with parameters, e.g. noisy_oracle:noise=0.5, or none (reference pairs without "
                        "g_hat, for `fit --method vrpo_crossfit`) (default: oracle)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="output .npz (read by `fit`) or .parquet (a tidy table) "
                        "(default: results/simulate/SCENARIO_nN_seedS.npz)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def parse_aux(text: str, allow_none: bool = False) -> dict | None:
    """``KIND[:key=value,...]`` -> ``{"kind": KIND, key: number}``; with ``allow_none``, ``none`` -> None (no
    auxiliary model)."""
    from robust_rlhf.simulate import AUX_MODELS, SpecError

    if allow_none and text == "none":
        return None
    kind, _, rest = text.partition(":")
    if kind not in AUX_MODELS:
        raise SpecError(f"--aux: auxiliary model {kind!r} is unknown; allowed: {', '.join(AUX_MODELS)}"
                        + (", none" if allow_none else ""))
    spec: dict = {"kind": kind}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SpecError(f"--aux: expected key=value after '{kind}:', got {item!r}")
        try:
            spec[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise SpecError(f"--aux: value of {key!r} must be a number, got {value!r}") from None
    return spec


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from robust_rlhf.simulate import SCENARIOS, Scenario, SpecError, get_scenario, sample, save
    from robust_rlhf.simulate.summary import summarize

    console = Console()
    if args.list:
        table = Table(title="registered scenarios")
        for col in ("name", "utility", "antisymmetric", "description"):
            table.add_column(col, overflow="fold")
        for name in SCENARIOS:
            sc = get_scenario(name)
            table.add_row(name, "yes" if sc.has_utility else "no", "yes" if sc.antisymmetric else "no",
                          sc.spec["description"])
        console.print(table)
        return 0
    if args.describe:
        print(get_scenario(args.describe).describe())
        return 0
    if args.out is not None and args.out.suffix not in (".npz", ".parquet"):
        raise SpecError(f"output file {str(args.out)!r} must end in .npz or .parquet")
    scenario = Scenario.from_spec(args.spec) if args.spec else get_scenario(args.scenario or DEFAULT_SCENARIO)
    M = args.M if args.M == "exact" else _int("--M", args.M)
    data = sample(scenario, n=args.n, seed=args.seed, M=M, unlabelled=args.unlabelled,
                  aux=parse_aux(args.aux, allow_none=True))
    out = args.out or Path("results/simulate") / f"{scenario.name}_n{args.n}_seed{args.seed}.npz"
    save(data, out)
    summary = summarize(data)
    summary["path"] = str(out)
    if args.json:
        print(_json.dumps(summary))
        return 0
    table = Table(title=f"{scenario.name}: {scenario.spec['description']}", show_header=False)
    table.add_column("quantity")
    table.add_column("value")
    fmt = lambda v: ", ".join(f"{x:.3f}" for x in v)  # noqa: E731
    rows = [
        ("labelled pairs / reference pairs", f"{summary['n']} / {summary['reference_pairs']} (M = {summary['M']}, "
                                             f"{summary['unlabelled']} unlabelled prompts)"),
        ("theta* (true reward)", fmt(summary["theta_star"])),
        ("theta_dagger (best BT fit)", fmt(summary["theta_dagger"])),
        ("distance from BT: mean (g* - s_dagger)^2", f"{summary['bt_misfit']:.4f}"),
        ("label balance: mean Z", f"{summary['label_balance']:.3f}"),
    ]
    if "ghat_disagreement" in summary:
        rows += [(f"g_hat = {args.aux}: share disagreeing with g*", f"{summary['ghat_disagreement']:.3f}"),
                 ("g_hat: mean |g_hat - g*|", f"{summary['ghat_mae']:.4f}")]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {out}")
    return 0


def _int(flag: str, value: str) -> int:
    from robust_rlhf.simulate import SpecError

    try:
        return int(value)
    except ValueError:
        raise SpecError(f"{flag}: expected an integer or 'exact', got {value!r}") from None
