"""The fleet: the devices of a run and the way to reach them, behind one small interface.

The engine (:mod:`harmony.engine`) decides what a round is — who takes part, from which start
states, how the results become the next global models — and asks a :class:`Fleet` to do the
work. A fleet only carries it out and reports what happened:

- :meth:`Fleet.train` runs one session per participant and yields a :class:`SessionResult` as
  each completes;
- :meth:`Fleet.aggregate` folds the results the engine accepted into the next global models;
- :meth:`Fleet.evaluate` has every device (personalise and) evaluate its model.

:class:`InProcessFleet` is every device in this process, called directly (the local engine).
``orchestrator.fleet.MqttCeleryFleet`` reaches agents over MQTT and runs the server halves as
Celery tasks with Redis buffers. Nothing here knows MQTT, Celery or Redis.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from harmony.aggregation import WeightedSum
from harmony.algorithms import StepStats, run_session
from harmony.data import load_dataset
from harmony.evaluate import ClientEvaluation, server_predictor
from harmony.experiment import DevicePlan, Experiment, State
from harmony.rounds import RoundPlan

ProgressFn = Callable[..., None]


@dataclass
class SessionResult:
    """What one (device, round) session produced: the trained client side ``θ_i``, the client's
    sample count ``n_i`` (its aggregation weight) and its training statistics. ``server_state`` is
    the server replica where the fleet hands it over (in-process); a fleet that aggregates where
    the replicas are (Redis) leaves it ``None``. ``status``: ``done``, ``dropped`` (the device
    vanished; no state) or ``late`` (past the deadline; no state). ``seconds``: the session's
    duration on the run's clock (measured, or modelled on the simulated clock), from the round's
    start. ``queued_s``: the part of it before the device was told to start (a session waiting for
    a free worker thread; 0 where sessions start at once, None where the device never started), so
    ``seconds - queued_s`` is the time the device trained."""

    client: int
    state: State
    n_i: int
    stats: StepStats
    server_state: State | None = None
    seconds: float = 0.0
    status: Literal["done", "dropped", "late"] = "done"
    extra: dict[str, Any] = field(default_factory=dict)
    queued_s: float | None = None

    @classmethod
    def missing(cls, client: int, status: Literal["dropped", "late"], seconds: float = 0.0) -> SessionResult:
        """A session that produced nothing to aggregate."""
        return cls(client, {}, 0, StepStats(), seconds=seconds, status=status)


@dataclass
class ResumePoint:
    """Where a run stands after its last finished round, as a fleet that keeps it (Redis) reports it."""

    last_round: int
    client_global: State
    server_global: State
    local_states: dict[int, State]
    records: list[dict[str, Any]]


class Fleet(Protocol):
    """The transport of a run (module docstring)."""

    runtime: str
    """``local`` or ``distributed``: what results.json calls the runtime."""
    resumes_itself: bool
    """True when the fleet keeps the run's progress itself (:meth:`begin_run` returns it)."""
    progress: ProgressFn
    concurrent: bool
    """True when sessions run side by side in real time (a stack), so a deadline can be derived from
    the try itself (:func:`harmony.rounds.derived_deadline_s`); False in one process."""

    def unreachable(self) -> set[int]:
        """Clients whose devices the fleet knows to be gone now (not invited to the next try)."""
        ...

    def wait_back(self, clients: list[int], timeout_s: float) -> None:
        """Before a retry: wait up to ``timeout_s`` for the devices of ``clients`` that are gone to
        come back (returns at once when none is gone)."""
        ...

    def begin_run(self, resume: bool) -> ResumePoint | None:
        """A run starts (``resume``: continues); a fleet that keeps progress returns where it stands."""
        ...

    def train(self, rnd: int, starts: dict[int, State], server_start: State, plan: RoundPlan
              ) -> Iterator[SessionResult]:
        """One session per participant (``starts``: client → round-start client state), from the
        server back end ``server_start``; yields each result as its session completes — or is
        dropped (``plan.drops``, or the device vanished) or passes ``plan.deadline_s``."""
        ...

    def aggregate(self, rnd: int, results: list[SessionResult], client_prev: State, server_prev: State
                  ) -> tuple[State, State]:
        """FedAvg of the server replicas and depth-aware averaging of the client sides of
        ``results``, folded in the given order (which fixes the float arithmetic); blocks nobody
        trained keep their ``*_prev`` values."""
        ...

    def evaluate(self, rnd: int, models: dict[int, State], server: State, personalise: bool
                 ) -> dict[int, ClientEvaluation]:
        """Every client evaluates ``models[i]`` (after the algorithm's personalisation when
        ``personalise``) against the server back end ``server``; client → its evaluation, in
        client order, without the devices that are gone (the engine reports them)."""
        ...

    def round_done(self, rnd: int, record: dict[str, Any], results: list[SessionResult]) -> None:
        """The engine accepted round ``rnd`` (``record`` is its round record)."""
        ...

    def round_failed(self, rnd: int, reason: str) -> None:
        """The engine rejected round ``rnd`` (e.g. diverged weights)."""
        ...

    def reassign(self, clients: list[int]) -> None:
        """The experiment moved ``clients`` to new split depths (``experiment.depths``): the devices
        train at them from the next round."""
        ...

    def describe(self) -> dict[str, Any]:
        """Extra fields for results.json (where the run's bits were computed)."""
        ...

    def close(self) -> None: ...


def flush_denormal() -> None:
    """Flush-to-zero is per-thread CPU state: every thread that runs a session's torch work sets
    it, so all processes of a run compute on the same arithmetic.

    Set it before the thread's first torch operation: torch's intra-op worker threads are started
    by the first parallel operation of the thread that runs it and inherit its floating-point
    state then; a later call changes the calling thread only, and the chunks its workers compute
    keep their denormals (measured: half of a two-thread product stayed denormal)."""
    torch.set_flush_denormal(True)


class TorchThread:
    """One thread for a process's in-process torch work, flushing denormals from its first
    operation on — so its intra-op workers flush too, whatever this process computed before
    (a test suite, a notebook, a benchmark that loaded data first). The agents' device threads
    and the worker's task threads start the same way; a run computed here therefore has their
    arithmetic. The thread takes torch's thread count when it first computes: make it after
    ``torch.set_num_threads``."""

    def __init__(self) -> None:
        self._ident: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, initializer=self._start, thread_name_prefix="harmony-torch")

    def _start(self) -> None:
        flush_denormal()
        self._ident = threading.get_ident()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the thread (directly when called from it); its result, or its
        exception raised here."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class InProcessFleet:
    """Every device of the plan in this process: sessions run one after another through
    :func:`harmony.algorithms.run_session`, messages passed by reference."""

    runtime = "local"
    resumes_itself = False
    concurrent = False

    def unreachable(self) -> set[int]:
        return set()

    def wait_back(self, clients: list[int], timeout_s: float) -> None:
        return None

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        cfg = experiment.cfg
        self.torch = TorchThread()
        """Sessions, aggregation, personalisation and evaluation run here (:class:`TorchThread`);
        a tool that computes with this fleet's devices and models should too (``fleet.torch.call``)."""
        dataset = load_dataset(cfg.data.dataset, experiment.data_dir)
        self.devices: dict[int, DevicePlan] = experiment.devices(range(experiment.num_clients), dataset)
        self.server = experiment.server()
        # one model per split depth and one server back end, reloaded for every session
        self.client_models = {d: experiment.client_model(d) for d in sorted(set(experiment.depths))}
        self.server_model = self.server.new_model()
        self.progress: ProgressFn = lambda event, **fields: None

    def begin_run(self, resume: bool) -> ResumePoint | None:
        return None

    def train(self, rnd: int, starts: dict[int, State], server_start: State, plan: RoundPlan
              ) -> Iterator[SessionResult]:
        """On the simulated clock a session's duration is its modelled time; a session that would
        drop or pass the deadline is not run (its work would be discarded). On the wall clock each
        session is run and timed."""
        simulated = self.experiment.cfg.fleet.clock == "simulated"
        for i, start in starts.items():
            estimate = None
            if simulated:  # the plan has the estimate (a plan built by hand may not)
                estimate = plan.estimates[i] if i in plan.estimates else self.experiment.session_estimate_s(i)
            if i in plan.drops:
                yield SessionResult.missing(i, "dropped", plan.drops[i] * (estimate or 0.0))
                continue
            if estimate is not None and plan.deadline_s is not None and estimate > plan.deadline_s:
                yield SessionResult.missing(i, "late", estimate)
                continue
            t0 = time.perf_counter()
            result = self.torch.call(self._session, i, rnd, start, server_start)
            result.seconds = estimate if estimate is not None else time.perf_counter() - t0
            result.queued_s = 0.0  # each session is timed (or modelled) from its own start
            yield result

    def _session(self, i: int, rnd: int, start: State, server_start: State) -> SessionResult:
        device = self.devices[i]
        client_model = self.client_models[device.depth]
        client_model.load_state_dict(start)
        self.server_model.load_state_dict(server_start)
        client = device.session(rnd, client_model)
        server = self.server.session(rnd, i, self.server_model)
        run_session(client, server, self.experiment.steps(i))
        # the models are reused by the next session: hand over copies
        return SessionResult(i, _clone(client.state()), device.data.samples, client.stats,
                             server_state=_clone(server.state()))

    def aggregate(self, rnd: int, results: list[SessionResult], client_prev: State, server_prev: State
                  ) -> tuple[State, State]:
        return self.torch.call(self._aggregate, results, client_prev, server_prev)

    def _aggregate(self, results: list[SessionResult], client_prev: State, server_prev: State
                   ) -> tuple[State, State]:
        client_sum, server_sum = WeightedSum(), WeightedSum()
        for result in results:
            assert result.server_state is not None
            client_sum.add(result.state, result.n_i)
            server_sum.add(result.server_state, result.n_i)
        return client_sum.average(client_prev), server_sum.average(server_prev)

    def evaluate(self, rnd: int, models: dict[int, State], server: State, personalise: bool
                 ) -> dict[int, ClientEvaluation]:
        """Batch-1 latency is measured once per split depth and shared by its clients."""
        return self.torch.call(self._evaluate, models, server, personalise)

    def _evaluate(self, models: dict[int, State], server: State, personalise: bool) -> dict[int, ClientEvaluation]:
        self.server_model.load_state_dict(server)
        predict = server_predictor(self.server_model)
        measured: dict[int, tuple[float, float]] = {}
        evaluations: dict[int, ClientEvaluation] = {}
        for i in sorted(models):
            device = self.devices[i]
            model = self.client_models[device.depth]
            model.load_state_dict(models[i])
            if personalise:
                device.personalise(model)
            ev = device.evaluate(model, predict, measure=device.depth not in measured)
            if ev.measured_s is not None:
                measured[device.depth] = ev.measured_s
            evaluations[i] = ClientEvaluation(ev.scores, measured.get(device.depth))
        return evaluations

    def round_done(self, rnd: int, record: dict[str, Any], results: list[SessionResult]) -> None:
        pass

    def round_failed(self, rnd: int, reason: str) -> None:
        pass

    def reassign(self, clients: list[int]) -> None:
        # the devices read their depth from the experiment; a depth no client had needs its model
        for d in sorted(set(self.experiment.depths) - set(self.client_models)):
            self.client_models[d] = self.experiment.client_model(d)

    def describe(self) -> dict[str, Any]:
        return {"machine": machine_info(self.experiment.torch_device)}

    def close(self) -> None:
        self.torch.close()


def _clone(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a run's bits depend on beyond its config: the same config on another CPU type can
    give other floats (the kernels torch picks depend on the instruction set), so results.json
    records the CPU, torch's kernel capability, its version and the thread count."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or platform.machine())
    info = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []
