"""Re-measure the CPU speed options docs/design.md §3 reports, on this machine, for one plain cnn8 step.

One plain hybrid-SFL training step (client prefix at depth 2, exit head, server back end,
hybrid loss, backward, two SGD updates) at batch 64, timed as the median of repeated steps:

- ``contiguous``     NCHW tensors (PyTorch's default layout)
- ``channels_last``  NHWC tensors and weights (what the engine uses: ``model.channels_last``)
- ``bf16_autocast``  channels-last under ``torch.autocast("cpu", dtype=torch.bfloat16)``
- ``compile``        channels-last, the step's forward through ``torch.compile`` (warm-up timed apart)
- ``vmap_8``         8 clients' steps batched through ``torch.func.vmap(grad(functional_call))``
                     against the same 8 gradient computations in an eager loop (``loop_8``)

    python benchmarks/speed_options.py            # full width, batch 64 (a few minutes)
    python benchmarks/speed_options.py --smoke    # tiny; seconds

The last line printed is one JSON object: seconds per step per option and ratios to channels-last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmony.models import build_model  # noqa: E402


def make_step(model, depth: int, channels_last: bool, autocast: bool = False, compiled: bool = False):
    client, server = model.client_model(depth), model.server_model()
    if channels_last:
        client, server = client.to(memory_format=torch.channels_last), server.to(memory_format=torch.channels_last)
    params = [*client.parameters(), *server.parameters()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = client.features(x)
        return 0.5 * F.cross_entropy(client.exit_head(z), y) + 0.5 * F.cross_entropy(server(z, depth), y)

    forward = torch.compile(loss_fn) if compiled else loss_fn

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = forward(x, y)
        loss.backward()
        opt.step()

    return step


def time_step(step, x: torch.Tensor, y: torch.Tensor, repeats: int, warmup: int = 2) -> tuple[float, float]:
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(x, y)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), warm


def vmap_vs_loop(model, depth: int, clients: int, x: torch.Tensor, y: torch.Tensor,
                 repeats: int) -> tuple[float, float]:
    """Per-client gradients for ``clients`` clients: one vmapped call against a Python loop."""
    from torch.func import functional_call, grad, vmap

    client, server = model.client_model(depth), model.server_model()
    cp = {k: v.detach() for k, v in client.named_parameters()}
    sp = {k: v.detach() for k, v in server.named_parameters()}

    def loss(cparams, sparams, xb, yb):
        z, exit_logits = functional_call(client, cparams, (xb,))
        server_logits = functional_call(server, sparams, (z, depth))
        return 0.5 * F.cross_entropy(exit_logits, yb) + 0.5 * F.cross_entropy(server_logits, yb)

    g = grad(loss, argnums=(0, 1))
    stacked_c = {k: v.expand(clients, *v.shape).clone() for k, v in cp.items()}
    stacked_s = {k: v.expand(clients, *v.shape).clone() for k, v in sp.items()}
    xs, ys = x.expand(clients, *x.shape).clone(), y.expand(clients, *y.shape).clone()
    batched = vmap(g)

    def run_vmap() -> None:
        batched(stacked_c, stacked_s, xs, ys)

    leaves = [*client.parameters(), *server.parameters()]

    def run_loop() -> None:  # the same gradients, eager autograd, one client after another
        for _ in range(clients):
            z, exit_logits = client(x)
            value = 0.5 * F.cross_entropy(exit_logits, y) + 0.5 * F.cross_entropy(server(z, depth), y)
            torch.autograd.grad(value, leaves)

    out = []
    for fn in (run_vmap, run_loop):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated options to skip (e.g. compile)")
    args = parser.parse_args()
    if args.smoke:
        args.width, args.batch, args.repeats = 0.25, 16, 3
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    model = build_model("cnn8", width=args.width)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))

    result: dict = {"bench": "speed_options", "threads": torch.get_num_threads(),
                    "size": {"width": args.width, "batch": args.batch, "depth": args.depth}}
    seconds: dict[str, float] = {}
    options = {
        "contiguous": dict(channels_last=False),
        "channels_last": dict(channels_last=True),
        "bf16_autocast": dict(channels_last=True, autocast=True),
        "compile": dict(channels_last=True, compiled=True),
    }
    for name, kw in options.items():
        if name in skip:
            continue
        step = make_step(model, args.depth, **kw)
        sec, warm = time_step(step, x, y, args.repeats if name != "bf16_autocast" else max(2, args.repeats // 4))
        seconds[name] = sec
        if name == "compile":
            result["compile_warmup_s"] = round(warm, 1)
        print(f"{name:>14}: {sec * 1e3:8.2f} ms/step", file=sys.stderr, flush=True)
    if "vmap" not in skip:
        v, loop = vmap_vs_loop(model, args.depth, 8, x, y, max(2, args.repeats // 4))
        seconds["vmap_8"], seconds["loop_8"] = v, loop
        print(f"{'vmap_8':>14}: {v * 1e3:8.2f} ms for 8 clients; loop {loop * 1e3:.2f} ms", file=sys.stderr)
    base = seconds.get("channels_last")
    result["seconds_per_step"] = {k: round(v, 5) for k, v in seconds.items()}
    if base:
        result["time_vs_channels_last"] = {k: round(v / base, 3) for k, v in seconds.items()
                                           if k not in ("vmap_8", "loop_8")}
    if "vmap_8" in seconds:
        result["vmap_time_vs_loop"] = round(seconds["vmap_8"] / seconds["loop_8"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
