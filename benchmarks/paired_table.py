"""Paired differences from a ``compare.json``: the reference algorithm minus every other row, per ρ,
paired by seed, under each τ policy asked for — as a Markdown table.

    python benchmarks/paired_table.py runs/dirichlet-b0.1/compare.json
    python benchmarks/paired_table.py runs/dirichlet-b0.1/compare.json --policies oracle,estimated_mix

Runs of one seed share the data partition, so the seed-to-seed spread that dominates each
algorithm's own interval cancels in the difference (``harmony.stats.paired_difference``): the
cells are "mean ± 95 % half-width" over seeds. A policy that a row lacks (a baseline without a
validation split, say) is left out of that row with a note. Nothing is run or re-evaluated here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harmony.stats import paired_difference  # noqa: E402


def per_seed(row: dict[str, Any], policy: str) -> list[list[float]] | None:
    """The row's accuracy per seed (× ρ) under ``policy``; ``oracle`` falls back to the row's own."""
    policies = row.get("policies") or {}
    if policy in policies:
        return policies[policy]["accuracy_per_seed"]
    return row["accuracy_per_seed"] if policy == "oracle" else None


def paired_rows(doc: dict[str, Any], reference: str, policies: list[str]) -> list[dict[str, Any]]:
    """One entry per (policy, other algorithm): ``cells`` [(mean, half-width)] per ρ."""
    rows = {r["algorithm"]: r for r in doc["rows"]}
    if reference not in rows:
        raise SystemExit(f"--reference {reference!r}: not a row of the document (rows: {sorted(rows)})")
    if len(doc["seeds"]) < 2:
        raise SystemExit(f"the document has one seed ({doc['seeds']}): a paired interval needs two or more")
    out = []
    for policy in policies:
        ref = per_seed(rows[reference], policy)
        if ref is None:
            raise SystemExit(f"--policies {policy!r}: the reference row {reference!r} does not report it")
        for name, row in rows.items():
            if name == reference:
                continue
            # the baseline under the same policy where it has one, else under its oracle
            other, used = per_seed(row, policy), policy
            if other is None:
                other, used = per_seed(row, "oracle"), "oracle"
            out.append({"policy": policy, "against": name, "against_policy": used,
                        "cells": paired_difference(ref, other)})
    return out


def markdown(doc: dict[str, Any], reference: str, entries: list[dict[str, Any]]) -> str:
    head = "| policy | " + reference + " minus | " + " | ".join(f"ρ={r:g}" for r in doc["rho"]) + " |"
    lines = [head, "| --- | --- |" + " ---: |" * len(doc["rho"])]
    for e in entries:
        against = e["against"] + ("" if e["against_policy"] == e["policy"] else f" ({e['against_policy']})")
        cells = " | ".join(f"{m:+.1f} ± {h:.1f}" for m, h in e["cells"])
        lines.append(f"| {e['policy']} | {against} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("compare_json", type=Path)
    ap.add_argument("--reference", default="harmony")
    ap.add_argument("--policies", default="oracle", help="comma-separated τ policies (default oracle)")
    args = ap.parse_args()
    doc = json.loads(args.compare_json.read_text())
    entries = paired_rows(doc, args.reference, [p for p in args.policies.split(",") if p])
    print(f"{args.compare_json}: seeds {doc['seeds']}, paired by seed (mean ± 95 % half-width)")
    print(markdown(doc, args.reference, entries))


if __name__ == "__main__":
    main()
