"""Local-engine client steps per second against the raw-compute floor.

The floor is the same forward/backward/SGD work in a bare loop (client prefix, exit head,
server back end, hybrid loss, one backward, two SGD updates) over the same batches, in the
same process with the same threads. The engine runs it through the algorithm interface
(U-shaped messages, fp16 features, per-session replicas, aggregation). Also reported: the
achieved GFLOP/s (FLOPs counted at the dispatcher with torch's per-op formulas over one real training step)
against this machine's dense fp32 matmul GFLOP/s.

    python benchmarks/engine_throughput.py            # full size (~1 minute)
    python benchmarks/engine_throughput.py --smoke    # seconds; what the test suite runs

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmony.algorithms import BatchStream  # noqa: E402
from harmony.config import validate_config  # noqa: E402
from harmony.engine import LocalEngine  # noqa: E402


class DispatchFlopCounter(TorchDispatchMode):
    """FLOPs of every dispatched op, from PyTorch's own per-op formulas.

    ``FlopCounterMode`` also tracks modules with backward hooks, and those hooks reject the
    ``autograd.backward(..., inputs=...)`` calls HARMONY makes; counting at the dispatcher needs no hooks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def bench_config(width: float, clients: int, steps: int, batch: int, rounds: int, algorithm: str = "multi-exit"):
    return validate_config({
        "name": "engine-throughput",
        "data": {"num_shards": 2 * clients, "train_fraction": min(1.0, 4 * batch * steps / (60000 / clients)),
                 "test_per_client": 10, "rhos": [0.0]},
        "model": {"family": "cnn8", "width": width},
        "fleet": {"num_clients": clients, "split_depths": [2, 3, 4]},
        "train": {"algorithm": algorithm, "rounds": rounds, "local_steps": steps, "batch_size": batch,
                  "lr": 0.01},
    })


def floor_step_fn(engine: LocalEngine, depth: int, gamma: float):
    """One bare training step on fresh copies of the models at ``depth``."""
    client = engine.fleet.client_models[depth]
    server = engine.fleet.server_model
    opt_c = torch.optim.SGD(client.parameters(), lr=0.01, momentum=0.9)
    opt_s = torch.optim.SGD(server.parameters(), lr=0.01, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        z = client.features(x)
        loss = gamma * F.cross_entropy(client.exit_head(z), y) + (1 - gamma) * F.cross_entropy(server(z, depth), y)
        opt_c.zero_grad(set_to_none=True)
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()
        opt_s.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny size for the test suite")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12, help="local steps per client per round")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--algorithm", default="multi-exit",
                        help="engine algorithm; the floor is always the plain hybrid-loss step, so for harmony "
                             "the ratio compares achieved GFLOP/s")
    args = parser.parse_args()
    if args.smoke:
        args.width, args.clients, args.steps, args.batch, args.rounds = 0.25, 3, 3, 32, 1
    torch.set_flush_denormal(True)
    cfg = bench_config(args.width, args.clients, args.steps, args.batch, args.rounds, args.algorithm)
    engine = LocalEngine(cfg)
    gamma = cfg.train.gamma

    # The batches each client would draw, pre-sampled for the floor loop.
    batches = []
    for i in range(args.clients):
        data = engine.fleet.devices[i].data
        stream = BatchStream(data.train_x, data.train_y, data.train_rows, args.batch,
                             torch.Generator().manual_seed(i), cfg.model.channels_last)
        batches.append([stream.next() for _ in range(args.steps)])
    steps_total = args.clients * args.steps * args.rounds

    # Warm up both paths once (allocator, oneDNN primitive caches).
    engine.run_session(0, 1)
    warm = floor_step_fn(engine, engine.experiment.depths[0], gamma)
    warm(*batches[0][0])

    engine = LocalEngine(cfg)
    t0 = time.perf_counter()
    engine.train()
    engine_s = time.perf_counter() - t0

    def floor_loop() -> None:
        for _ in range(args.rounds):
            for i in range(args.clients):
                step = floor_step_fn(engine, engine.experiment.depths[i], gamma)
                for x, y in batches[i]:
                    step(x, y)

    # the floor on the engine's torch thread: the same thread pool and floating-point state
    t0 = time.perf_counter()
    engine.fleet.torch.call(floor_loop)
    floor_s = time.perf_counter() - t0

    def counted(fn, *fn_args) -> int:
        with DispatchFlopCounter() as counter:  # a dispatch mode counts its own thread's ops
            fn(*fn_args)
        return counter.total

    floor_flops, engine_flops = 0, 0
    one_step = LocalEngine(cfg.with_overrides(**{"train.local_steps": 1}))
    for i in range(args.clients):
        step = floor_step_fn(engine, engine.experiment.depths[i], gamma)
        floor_flops += counted(step, *batches[i][0]) * args.steps * args.rounds
        # the engine's own work for one step, counted on the thread that does it
        engine_flops += one_step.fleet.torch.call(counted, one_step.run_session, i, 1) * args.steps * args.rounds

    mm = matmul_gflops()
    gflops, floor_gflops = engine_flops / engine_s / 1e9, floor_flops / floor_s / 1e9
    result = {
        "bench": "engine_throughput",
        "algorithm": args.algorithm,
        "ratio_to_floor": round(gflops / floor_gflops, 4),
        "engine_steps_per_s": round(steps_total / engine_s, 3),
        "floor_steps_per_s": round(steps_total / floor_s, 3),
        "step_flops_vs_plain": round(engine_flops / floor_flops, 3),
        "gflops": round(gflops, 2),
        "floor_gflops": round(floor_gflops, 2),
        "matmul_gflops": round(mm, 2),
        "threads": torch.get_num_threads(),
        "size": {"width": args.width, "clients": args.clients, "steps": args.steps, "batch": args.batch,
                 "rounds": args.rounds},
    }
    print(f"{args.algorithm}: engine {result['engine_steps_per_s']} steps/s ({result['gflops']} GFLOP/s), "
          f"bare plain-step floor {result['floor_steps_per_s']} steps/s ({result['floor_gflops']} GFLOP/s); "
          f"ratio {result['ratio_to_floor']}; one step = {result['step_flops_vs_plain']}x a plain step's FLOPs; "
          f"dense matmul {result['matmul_gflops']} GFLOP/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
