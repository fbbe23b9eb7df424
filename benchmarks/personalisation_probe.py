"""Where an algorithm's accuracy comes from: train once, then evaluate the same trained model under
several personalisation settings, split into on-device and server-fallback accuracy.

For each variant (fine-tuning steps, rate, momentum; ``none`` = the aggregated model as is) it
prints, in %, mean over clients, **on each client's validation set** (``data.val_per_client``
held-out samples, never trained on; docs/design.md §14) — a tuning tool never reads the test
pools that the tables report:

- ``exit_id``: the on-device exit's accuracy on the client's own (in-distribution) classes;
- ``server_id`` / ``server_ood``: the server fallback's accuracy on features of the client's
  (personalised) extractor, for its own classes / for the classes it never trained on;
- ``oracle_rho0`` / ``oracle_rho08``: the reported metric's validation counterpart (the best τ of
  the sweep per client on its validation set) at the first and the last ρ of ``data.rhos``;
  ``oracle_mean`` its mean over every ρ of ``data.rhos`` (the one number to choose a knob by).

    python benchmarks/personalisation_probe.py --algorithm harmony --out runs/probe-harmony \\
        --set data.train_fraction=0.25 --set model.width=0.5 --set train.rounds=10

Without ``--set data.val_per_client=N`` the probe holds out 50 samples per client
(:data:`DEFAULT_VAL_PER_CLIENT`); periodic evaluation (which reads the test pools) is switched off.

Training writes a checkpoint in ``--out``; running again with the same settings reuses it. The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harmony.algorithms.base import SessionContext  # noqa: E402
from harmony.algorithms.splitgp import finetune_on_device  # noqa: E402
from harmony.config import load_config  # noqa: E402
from harmony.engine import LocalEngine  # noqa: E402
from harmony.evaluate import server_predictor  # noqa: E402
from harmony.fleet import InProcessFleet  # noqa: E402

VARIANTS = "none,5:0.001:0,5:0.01:0,1:0.01:0,5:0.01:0.9"
DEFAULT_VAL_PER_CLIENT = 50


def parse_variant(text: str) -> tuple[int, float, float]:
    """``none`` or ``STEPS:LR:MOMENTUM``."""
    if text == "none":
        return 0, 0.0, 0.0
    try:
        steps, lr, momentum = text.split(":")
        return int(steps), float(lr), float(momentum)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--variants: {text!r} is not 'none' or STEPS:LR:MOMENTUM") from None


def evaluate_variant(engine: LocalEngine, steps: int, lr: float, momentum: float) -> dict[str, float]:
    """The variant's validation scores, computed on the fleet's torch thread (the run's arithmetic)."""
    assert isinstance(engine.fleet, InProcessFleet)
    return engine.fleet.torch.call(_evaluate_variant, engine, steps, lr, momentum)


def _evaluate_variant(engine: LocalEngine, steps: int, lr: float, momentum: float) -> dict[str, float]:
    cfg, fleet = engine.cfg, engine.fleet
    train = cfg.train.model_copy(update={"finetune_steps": steps, "finetune_lr": lr or cfg.train.finetune_lr,
                                        "finetune_momentum": momentum})
    fleet.server_model.load_state_dict(engine.server_global)
    predict = server_predictor(fleet.server_model)
    cols: dict[str, list[float]] = {k: [] for k in ("exit_id", "server_id", "server_ood", "oracle_rho0",
                                                    "oracle_rho08", "oracle_mean")}
    for i in range(cfg.fleet.num_clients):
        device = fleet.devices[i]
        model = fleet.client_models[device.depth]
        model.load_state_dict(engine.client_start_state(i))
        ctx = SessionContext(cfg.seed, engine.experiment.eval_round, i, train, engine.experiment.torch_device)
        if steps:
            finetune_on_device(model, device.batches(ctx, "personalise"), ctx)
        ev = device.evaluate(model, predict, measure=False, split="validation")
        cols["oracle_rho0"].append(ev.scores[0].oracle.accuracy)
        cols["oracle_rho08"].append(ev.scores[-1].oracle.accuracy)
        cols["oracle_mean"].append(float(np.mean([s.oracle.accuracy for s in ev.scores])))
        out, n_id, n_ood = device.pool_outputs(model, predict, "validation")
        cols["exit_id"].append(float(out.exit_correct[:n_id].mean()))
        cols["server_id"].append(float(out.server_correct[:n_id].mean()))
        cols["server_ood"].append(float(out.server_correct[n_id:n_id + n_ood].mean()))
    return {k: round(100 * float(np.mean(v)), 2) for k, v in cols.items()}


def tuning_config(path: Path, algorithm: str, overrides: list[str]):
    """The probe's config: ``overrides`` with a validation split (``DEFAULT_VAL_PER_CLIENT`` unless
    they set one) and no periodic evaluation, so that nothing of it reads a test pool."""
    cfg = load_config(path, [f"data.val_per_client={DEFAULT_VAL_PER_CLIENT}", f"train.algorithm={algorithm}",
                             *overrides, "eval.eval_every=0"])
    if cfg.data.val_per_client == 0:
        raise SystemExit("personalisation_probe: data.val_per_client = 0 leaves nothing to tune on but the test "
                         "pools; give a validation split (e.g. --set data.val_per_client=50)")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "fmnist-shard2-50.yaml")
    ap.add_argument("--algorithm", default="harmony")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--out", type=Path, required=True, help="run directory (checkpoint reused when present)")
    ap.add_argument("--variants", default=VARIANTS, help=f"comma-separated (default {VARIANTS})")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants.split(",") if v]
    cfg = tuning_config(args.config, args.algorithm, args.set)
    engine = LocalEngine(cfg, out_dir=args.out)
    if (args.out / "checkpoint.pt").is_file():
        engine.resume()
    t0 = time.perf_counter()
    engine.train()
    rows = []
    for (steps, lr, momentum), name in zip(variants, [v for v in args.variants.split(",") if v], strict=True):
        row = {"variant": name, **evaluate_variant(engine, steps, lr, momentum)}
        rows.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print(json.dumps({"bench": "personalisation_probe", "algorithm": args.algorithm, "overrides": args.set,
                      "train_seconds": round(time.perf_counter() - t0, 1), "rows": rows}))


if __name__ == "__main__":
    main()
