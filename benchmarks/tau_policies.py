"""How far each τ policy is from the oracle, and how much of that gap no policy can close.

    python benchmarks/tau_policies.py RUN_DIR [RUN_DIR ...]

A run directory is one of ``harmony run``'s (or one seed of ``harmony compare``'s) with a
validation split (``data.val_per_client``) and a final checkpoint. Its trained model is
personalised and evaluated again exactly as the run's own evaluation did (the oracle row is
checked against the run's ``results.json``), and per ρ the script prints, in %, mean over
clients:

- every policy the run reports (``oracle``, ``fixed``, ``validation``, ``entropy_quantile``,
  ``estimated_mix``, ...) and its gap to the oracle;
- ``oracle_crossfit``: the oracle's τ chosen on one half of each client's test queries and scored
  on the other half (both ways, averaged over ``--folds`` random halvings). It still reads the
  test labels, but it does not score a τ on the samples it was picked on: its distance to the
  oracle is the oracle's selection optimism — the part of any policy's gap that comes from the
  oracle, not from the policy;
- ``pooled_depth``: ``validation`` with each client's expected-accuracy curve averaged half and
  half with the mean curve of the clients at its split depth (what a device could do if the
  server shared the fleet's per-τ validation counts; a diagnostic, not a policy of the runtimes).

Nothing here is tuned: the policies are evaluated as the runtimes define them. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harmony.config import ExperimentConfig, validate_config  # noqa: E402
from harmony.engine import LocalEngine  # noqa: E402
from harmony.evaluate import (  # noqa: E402
    ClientOutputs,
    best_tau,
    expected_accuracy_curve,
    oracle_threshold,
    pool_select,
    score_threshold,
    server_predictor,
)
from harmony.fleet import InProcessFleet  # noqa: E402


def crossfit(outputs: ClientOutputs, select: np.ndarray, taus: list[float], folds: int, seed: int) -> float:
    """Accuracy of the oracle τ chosen on one random half of ``select`` and scored on the other."""
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(folds):
        perm = rng.permutation(select)
        a, b = perm[: perm.size // 2], perm[perm.size // 2:]
        for pick, score in ((a, b), (b, a)):
            tau = oracle_threshold(outputs, pick, taus).tau
            accs.append(score_threshold(outputs, score, tau).accuracy * score.size)
    return float(np.sum(accs)) / (folds * select.size)


def analyse(run_dir: Path, folds: int) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    cfg = validate_config(results["config"])
    if cfg.data.val_per_client == 0:
        raise SystemExit(f"{run_dir}: no validation split (data.val_per_client = 0): nothing but the oracle to compare")
    engine = LocalEngine(cfg, out_dir=run_dir)
    engine.resume()
    assert isinstance(engine.fleet, InProcessFleet)
    # on the fleet's torch thread, as the run's own evaluation was (the same arithmetic)
    table = engine.fleet.torch.call(_policy_table, engine, cfg, folds)
    reported = results["evaluation"]["policies"]["oracle"]["accuracy"]
    if not np.allclose(table["oracle"], reported, atol=1e-9):
        raise SystemExit(f"{run_dir}: re-evaluation gives oracle {table['oracle']} but the run reported {reported}: "
                         "not the run's model or code")
    return {"run": str(run_dir), "algorithm": cfg.train.algorithm, "seed": cfg.seed, "rho": list(cfg.data.rhos),
            "accuracy": table}


def _policy_table(engine: LocalEngine, cfg: ExperimentConfig, folds: int) -> dict[str, list[float]]:
    """Every policy's mean accuracy per ρ, re-evaluated from the engine's trained models."""
    fleet = engine.fleet
    fleet.server_model.load_state_dict(engine.server_global)
    predict = server_predictor(fleet.server_model)
    rhos, taus = list(cfg.data.rhos), list(cfg.eval.taus)
    per: dict[str, list[list[float]]] = {}
    curves: dict[int, list[tuple[int, list[np.ndarray], ClientOutputs, np.ndarray, int, list, list]]] = {}
    for i in range(cfg.fleet.num_clients):
        device = fleet.devices[i]
        model = fleet.client_models[device.depth]
        model.load_state_dict(engine.client_start_state(i))
        device.personalise(model)
        ev = device.evaluate(model, predict, measure=False)
        for s in ev.scores:
            for name, p in s.all_policies().items():
                per.setdefault(name, [[] for _ in rhos])[rhos.index(s.rho)].append(p.accuracy)
        val, _, v_id, _, _, _ = device._outputs(model, predict, "validation", rhos, whole_id_pool=True,
                                                whole_ood_pool=True)
        test, _, n_id, _, id_counts, ood_counts = device._outputs(model, predict, "test", rhos)
        selects = [pool_select(n_id, a, b) for a, b in zip(id_counts, ood_counts, strict=True)]
        for k, select in enumerate(selects):
            per.setdefault("oracle_crossfit", [[] for _ in rhos])[k].append(
                crossfit(test, select, taus, folds, cfg.seed * 1000 + i))
        own = [expected_accuracy_curve(val, v_id, b / max(1, a + b), taus)
               for a, b in zip(id_counts, ood_counts, strict=True)]
        curves.setdefault(device.depth, []).append((i, own, test, selects, n_id,
                                                    id_counts, ood_counts))
    for members in curves.values():
        mean = [np.mean([m[1][k] for m in members], axis=0) for k in range(len(rhos))]
        for _, own, test, selects, _, _, _ in members:
            for k in range(len(rhos)):
                tau = best_tau(0.5 * own[k] + 0.5 * mean[k], taus)
                per.setdefault("pooled_depth", [[] for _ in rhos])[k].append(
                    score_threshold(test, selects[k], tau).accuracy)
    return {name: [100.0 * float(np.mean(v)) for v in cols] for name, cols in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (results.json and checkpoint.pt)")
    ap.add_argument("--folds", type=int, default=20, help="random halvings per client for oracle_crossfit")
    args = ap.parse_args()
    docs = []
    for run in args.runs:
        doc = analyse(run, args.folds)
        docs.append(doc)
        oracle = doc["accuracy"]["oracle"]
        print(f"{run}  ({doc['algorithm']}, seed {doc['seed']})")
        for name, acc in doc["accuracy"].items():
            gaps = " ".join(f"{a - o:+5.1f}" for a, o in zip(acc, oracle, strict=True))
            print(f"  {name:18s} {' '.join(f'{a:6.2f}' for a in acc)}   gap {gaps}")
    print(json.dumps({"bench": "tau_policies", "runs": docs}))


if __name__ == "__main__":
    main()
