"""Per-client test with entropy early exit (docs/design.md §3 "Inference").

A client exits on device when the Shannon entropy (nats) of ``softmax(H_d(f(x)))`` is
below ``τ``; otherwise it offloads ``f(x)`` (fp16) and the server answers
``argmax g_d(f(x))``. The models run once per client on the union of its test pools
(:func:`client_outputs`); every OOD ratio ρ and threshold τ is then a slice and a mask
over those arrays (:func:`score_client`), so the sweep costs no extra forward passes.

The server is reached through a :data:`ServerPredict` function, so the same code runs in
both runtimes: in-process it is :func:`server_predictor` (the server model called
directly); in the distributed runtime it is the device's ``infer`` → ``infer_reply``
exchange with the ``hsfl.infer`` Celery task. Both paths hand the server exactly the same
tensors: the features after :func:`offload_features` (cast to the feature dtype — fp16 as on
the wire — in the memory layout the server side restores), split by
:func:`offload_chunks` into requests of at most :data:`MAX_OFFLOAD_BYTES` (one wire
message). Hence the distributed accuracy table equals the local one bit for bit; for
batches that fit one request (every config we ship) the chunking changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from harmony.models import ClientModel, ServerModel

ServerPredict = Callable[[torch.Tensor, int], torch.Tensor]
"""``(offloaded features, split depth) → int64 predictions``: the server side of the fallback."""

MAX_OFFLOAD_BYTES = 6 * 1024 * 1024
"""Largest feature tensor (bytes) one server call receives: one ``infer`` message must stay
under the wire's 8 MiB limit (``broker.limits.MAX_MESSAGE_BYTES``) with its envelope."""


def server_predictor(server: ServerModel) -> ServerPredict:
    """The in-process fallback: the server model's argmax on the (up-cast) offloaded features."""
    server.eval()

    @torch.no_grad()
    def predict(features: torch.Tensor, depth: int) -> torch.Tensor:
        return server(features.float(), depth).argmax(1)

    return predict


def offload_features(z: torch.Tensor, feature_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Cut-layer features as they are offloaded: in ``feature_dtype``, and in the layout the
    server side restores from the row-major wire tensor (channels-last for 4-d features when
    the model runs channels-last, else contiguous). A no-op on the layout for the usual
    contiguous/channels-last activations."""
    z = z.to(feature_dtype)
    if channels_last and z.dim() == 4:
        return z.contiguous(memory_format=torch.channels_last)
    return z.contiguous()


def offload_chunks(n: int, sample_bytes: int, max_bytes: int = MAX_OFFLOAD_BYTES) -> list[slice]:
    """Batch slices of at most ``max_bytes`` of features each (at least one sample per slice)."""
    step = max(1, max_bytes // max(1, sample_bytes))
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def _offload_predict(predict: ServerPredict, z: torch.Tensor, depth: int, max_bytes: int) -> torch.Tensor:
    n = z.shape[0]
    sample_bytes = (z.numel() // max(1, n)) * z.element_size()
    parts = [predict(z[s], depth) for s in offload_chunks(n, sample_bytes, max_bytes)]
    predictions = torch.cat(parts) if len(parts) > 1 else parts[0]
    if predictions.shape != (n,):
        raise ValueError(f"the server answered {list(predictions.shape)} predictions for {n} offloaded samples")
    return predictions


def _as_predict(server: ServerModel | ServerPredict) -> ServerPredict:
    if isinstance(server, torch.nn.Module):
        return server_predictor(cast(ServerModel, server))
    return server


def entropy_nats(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of ``softmax(logits)`` per row, in nats (max ``ln C``)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


@dataclass
class ClientOutputs:
    """Per test sample: exit entropy, and whether the exit and the server are right."""

    exit_entropy: np.ndarray  # float64; +inf where the algorithm has no early exit
    exit_correct: np.ndarray  # bool
    server_correct: np.ndarray  # bool


@torch.no_grad()
def client_outputs(
    client: ClientModel,
    server: ServerModel | ServerPredict,
    x: torch.Tensor,
    y: torch.Tensor,
    early_exit: bool,
    feature_dtype: torch.dtype = torch.float16,
    batch_size: int = 500,
    channels_last: bool = False,
    max_offload_bytes: int = MAX_OFFLOAD_BYTES,
) -> ClientOutputs:
    """Run the on-device model and the server fallback (a model, or a :data:`ServerPredict`) over ``x`` once."""
    client.eval()
    predict = _as_predict(server)
    entropies, exit_ok, server_ok = [], [], []
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        z = client.features(xb)
        if early_exit:
            exit_logits = client.exit_head(z)
            entropies.append(entropy_nats(exit_logits))
            exit_ok.append(exit_logits.argmax(1) == yb)
        else:
            entropies.append(torch.full((xb.shape[0],), float("inf")))
            exit_ok.append(torch.zeros(xb.shape[0], dtype=torch.bool))
        offloaded = offload_features(z, feature_dtype, channels_last)
        server_ok.append(_offload_predict(predict, offloaded, client.depth, max_offload_bytes).to(yb.device) == yb)
    return ClientOutputs(
        exit_entropy=torch.cat(entropies).double().cpu().numpy(),
        exit_correct=torch.cat(exit_ok).cpu().numpy(),
        server_correct=torch.cat(server_ok).cpu().numpy(),
    )


@dataclass
class ThresholdScore:
    """Accuracy and offload probability of one client's test set at one τ."""

    tau: float
    accuracy: float
    offload_probability: float


def score_threshold(outputs: ClientOutputs, select: np.ndarray, tau: float) -> ThresholdScore:
    """Accuracy when samples ``select`` exit below entropy ``tau`` and offload otherwise."""
    ent = outputs.exit_entropy[select]
    exits = ent < tau
    correct = np.where(exits, outputs.exit_correct[select], outputs.server_correct[select])
    n = max(1, select.size)
    return ThresholdScore(tau, float(correct.sum()) / n, float((~exits).sum()) / n)


def oracle_threshold(outputs: ClientOutputs, select: np.ndarray, taus: list[float]) -> ThresholdScore:
    """The best τ of the sweep for this client (ties: the larger τ, which offloads less)."""
    best: ThresholdScore | None = None
    for tau in sorted(taus):
        s = score_threshold(outputs, select, tau)
        if best is None or s.accuracy >= best.accuracy:
            best = s
    assert best is not None
    return best


NO_EXIT_TAU = 1e3
"""τ that exits every sample with a finite entropy: a policy's τ where its rule gives +∞ (an
offload budget of 0, or an algorithm without an exit, whose entropies are all +∞)."""


def entropy_quantile_tau(entropies: np.ndarray, budget: float) -> float:
    """The label-free τ of ``eval.tau_policy: entropy_quantile``: offload the ``budget`` fraction
    of these queries with the highest entropy (``round(budget · n)`` of them; ties at τ offload
    too) — for a device's own in-distribution validation queries, its offload budget on its own
    classes; queries from unseen classes, with higher entropy, then offload more often."""
    e = np.sort(np.asarray(entropies, dtype=np.float64))
    k = int(round(budget * e.size))
    if e.size == 0 or k == 0:
        return NO_EXIT_TAU
    tau = float(e[e.size - k])
    return tau if np.isfinite(tau) else NO_EXIT_TAU


@dataclass
class ClientScore:
    """One client's result at one OOD ratio: the oracle τ, the fixed τ, and the thresholds the
    device chose on its own validation set (``policies``: ``validation``, ``entropy_quantile``;
    empty without one)."""

    rho: float
    oracle: ThresholdScore
    fixed: ThresholdScore
    policies: dict[str, ThresholdScore] = field(default_factory=dict)

    def policy(self, name: str) -> ThresholdScore:
        """The score under τ policy ``name`` (``oracle``, ``fixed`` or one of ``policies``)."""
        if name == "oracle":
            return self.oracle
        if name == "fixed":
            return self.fixed
        if name not in self.policies:
            raise KeyError(f"τ policy {name!r} was not evaluated for this client (it needs a validation set: "
                           "data.val_per_client)")
        return self.policies[name]

    def all_policies(self) -> dict[str, ThresholdScore]:
        return {"oracle": self.oracle, "fixed": self.fixed, **self.policies}


@dataclass
class ClientEvaluation:
    """One client's evaluation: its scores per ρ and, when measured, its batch-1 latency
    ``(on-device seconds, server fallback seconds)``."""

    scores: list[ClientScore]
    measured_s: tuple[float, float] | None = None


def pool_select(n_id_used: int, n_id: int, n_ood: int) -> np.ndarray:
    """Positions in outputs over ``n_id_used`` ID then OOD samples of the first ``n_id`` ID and ``n_ood`` OOD ones."""
    return np.concatenate([np.arange(n_id), n_id_used + np.arange(n_ood)])


def score_client(
    outputs: ClientOutputs, n_id_used: int, n_ood_used: int, id_counts: list[int], ood_counts: list[int],
    rhos: list[float], taus: list[float], fixed_tau: float, policy_taus: list[dict[str, float]] | None = None,
) -> list[ClientScore]:
    """Scores per ρ. ``outputs`` cover ``n_id_used`` ID samples then ``n_ood_used`` OOD
    samples (nested pools); at ρ index ``k`` the test set is the first ``id_counts[k]`` ID
    and the first ``ood_counts[k]`` OOD samples. ``policy_taus[k]``: thresholds chosen without
    the test labels (policy → τ), scored as well."""
    scores = []
    for k, (rho, n_id, n_ood) in enumerate(zip(rhos, id_counts, ood_counts, strict=True)):
        select = pool_select(n_id_used, n_id, n_ood)
        policies = {name: score_threshold(outputs, select, tau)
                    for name, tau in (policy_taus[k] if policy_taus else {}).items()}
        scores.append(ClientScore(rho, oracle_threshold(outputs, select, taus),
                                  score_threshold(outputs, select, fixed_tau), policies))
    return scores


def expected_accuracy_curve(val: ClientOutputs, n_id_used: int, rho: float, taus: list[float]) -> np.ndarray:
    """Per τ of ``taus`` (in their order), the expected accuracy ``(1 − ρ)·acc_ID(τ) + ρ·acc_OOD(τ)``
    for a query mix with OOD share ``rho``, over the device's whole validation pools
    (``n_id_used`` ID samples, then the OOD ones): every validation sample counts at every ρ."""
    e, ok_exit, ok_server = val.exit_entropy, val.exit_correct, val.server_correct
    pools = [(slice(0, n_id_used), 1.0 - rho), (slice(n_id_used, e.size), rho)]
    out = np.zeros(len(taus))
    for j, tau in enumerate(taus):
        for sl, weight in pools:
            if weight > 0 and e[sl].size:
                out[j] += weight * float(np.where(e[sl] < tau, ok_exit[sl], ok_server[sl]).mean())
    return out


def best_tau(values: np.ndarray, taus: list[float]) -> float:
    """The τ of the highest of ``values`` (one per τ of ``taus``; ties: the larger τ, as :func:`oracle_threshold`)."""
    best_tau_, best = None, -1.0
    for j in sorted(range(len(taus)), key=lambda j: taus[j]):
        if values[j] >= best:
            best_tau_, best = taus[j], values[j]
    assert best_tau_ is not None
    return best_tau_


def expected_accuracy_threshold(val: ClientOutputs, n_id_used: int, rho: float, taus: list[float]) -> float:
    """The best τ of the sweep for the expected accuracy at OOD share ``rho``
    (:func:`expected_accuracy_curve`) rather than on a ρ-sized subset of the validation pools."""
    return best_tau(expected_accuracy_curve(val, n_id_used, rho, taus), taus)

MIN_BANDWIDTH_NATS = 0.05
"""Floor of the kernel width in :func:`mixture_share`: confident exits put many entropies at ≈ 0."""


def _kde(sample: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Gaussian kernel density of ``sample`` at ``points`` (Silverman's width, floored)."""
    n = sample.size
    spread = min(float(np.std(sample)), float(np.subtract(*np.percentile(sample, [75, 25]))) / 1.34)
    h = max(MIN_BANDWIDTH_NATS, 0.9 * spread * n ** -0.2)
    z = (points[:, None] - sample[None, :]) / h
    return np.exp(-0.5 * z * z).sum(axis=1) / (n * h * np.sqrt(2 * np.pi))


def mixture_share(val: ClientOutputs, n_id_used: int, query_entropies: np.ndarray, grid: int = 201) -> float:
    """The share of OOD queries among ``query_entropies`` (unlabelled), by maximum likelihood: the
    queries' entropies modelled as the mixture ``(1 − ρ)·f_ID + ρ·f_OOD``, with ``f_ID`` / ``f_OOD``
    kernel densities of the device's ID / OOD validation entropies; ρ̂ the best of ``grid`` values
    in [0, 1] (0 when a pool or the queries have no finite entropy: no exit to read)."""
    e_id, e_ood = val.exit_entropy[:n_id_used], val.exit_entropy[n_id_used:]
    q = np.asarray(query_entropies, dtype=np.float64)
    e_id, e_ood, q = e_id[np.isfinite(e_id)], e_ood[np.isfinite(e_ood)], q[np.isfinite(q)]
    if e_id.size < 2 or e_ood.size < 2 or q.size == 0:
        return 0.0
    f_id, f_ood = _kde(e_id, q), _kde(e_ood, q)
    rhos = np.linspace(0.0, 1.0, grid)
    loglik = np.log((1 - rhos[:, None]) * f_id[None, :] + rhos[:, None] * f_ood[None, :] + 1e-300).sum(axis=1)
    return float(rhos[int(np.argmax(loglik))])


def validation_taus(val: ClientOutputs, n_id_used: int, id_counts: list[int], ood_counts: list[int],
                    taus: list[float], budget: float, query_entropies: list[np.ndarray] | None = None
                    ) -> list[dict[str, float]]:
    """The thresholds a device chooses on its own validation outputs (``val``: its whole ID pool,
    ``n_id_used`` samples, then its whole OOD pool), per ρ index ``k`` (the test mix of
    ``id_counts[k]`` ID and ``ood_counts[k]`` OOD queries):

    - ``validation`` — the best τ of the sweep for the expected validation accuracy at the true
      share ρ (:func:`expected_accuracy_threshold`; its own labels, never the test labels);
    - ``entropy_quantile`` — label-free, one τ for every ρ from its ID validation entropies
      (:func:`entropy_quantile_tau`);
    - with ``query_entropies[k]`` (the exit entropies of its queries at ρ index ``k``, no labels)
      ``estimated_mix`` — the same search at the share ρ̂ it estimates from those entropies
      (:func:`mixture_share`): it needs no knowledge of ρ."""
    quantile = entropy_quantile_tau(val.exit_entropy[:n_id_used], budget)
    out = []
    for k, (n_id, n_ood) in enumerate(zip(id_counts, ood_counts, strict=True)):
        chosen = {"validation": expected_accuracy_threshold(val, n_id_used, n_ood / max(1, n_id + n_ood), taus),
                  "entropy_quantile": quantile}
        if query_entropies is not None:
            rho_hat = mixture_share(val, n_id_used, query_entropies[k])
            chosen["estimated_mix"] = expected_accuracy_threshold(val, n_id_used, rho_hat, taus)
        out.append(chosen)
    return out


@torch.no_grad()
def measure_latency_s(
    client: ClientModel, server: ServerModel | ServerPredict, x: torch.Tensor, early_exit: bool, repeats: int,
    feature_dtype: torch.dtype = torch.float16, channels_last: bool = False,
) -> tuple[float, float]:
    """Median wall-clock seconds per sample at batch 1: (on-device forward, server fallback).
    In-process the transfer is not included (it is modelled); through a remote
    :data:`ServerPredict` the second figure is the real round trip (broker and server)."""
    client.eval()
    predict = _as_predict(server)
    tc, ts = [], []
    for i in range(repeats + 2):  # two warm-up passes
        xb = x[i % x.shape[0] : i % x.shape[0] + 1]
        if channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        z = client.features(xb)
        if early_exit:
            client.exit_head(z)
        t1 = time.perf_counter()
        predict(offload_features(z, feature_dtype, channels_last), client.depth)
        t2 = time.perf_counter()
        if i >= 2:
            tc.append(t1 - t0)
            ts.append(t2 - t1)
    return float(np.median(tc)), float(np.median(ts))
