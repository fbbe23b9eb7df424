"""Prometheus metrics of ``harmony monitor --web`` (``/metrics``): a collector over the
:class:`~testbed.monitor.state.MonitorState`, in its own ``CollectorRegistry`` (no process
metrics of the default registry), so the page and the scrape read the same state.

Counters count since the monitor started (a restarted monitor starts again from what the
current run's events say, and Prometheus' ``rate()`` treats that as a counter reset)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from testbed.monitor.state import DURATION_BUCKETS, SESSION_OUTCOMES, MonitorState


class StateCollector(Collector):
    """The metric names of docs/monitoring.md from one state."""

    def __init__(self, state: MonitorState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        st = self.state
        with st._lock:
            snap = st.snapshot()
            durations = (list(st.duration_buckets), st.duration_sum)
            bytes_total = dict(st.bytes_total)
        counters = snap["counters"]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter("harmony_rounds_completed_total", "Rounds that finished (aggregated)",
                      counters["rounds_completed"])
        yield counter("harmony_rounds_failed_total", "Tries of a round that failed (below quorum, diverged)",
                      counters["rounds_failed"])
        yield counter("harmony_round_retries_total", "Rounds tried again after a failed try", counters["round_retries"])
        sessions = CounterMetricFamily("harmony_sessions_total", "Sessions by outcome", labels=["outcome"])
        for outcome in SESSION_OUTCOMES:
            sessions.add_metric([outcome], counters["sessions"][outcome])
        yield sessions
        yield counter("harmony_stragglers_total", "Sessions past the round deadline, left out",
                      counters["sessions"]["late"])
        yield counter("harmony_dropouts_total", "Sessions whose device vanished, left out",
                      counters["sessions"]["dropped"])
        rejected = CounterMetricFamily("harmony_rejected_messages_total", "Messages the server side rejected",
                                       labels=["code"])
        for code, n in sorted(counters["rejected"].items()):
            rejected.add_metric([code], n)
        yield rejected
        moved = CounterMetricFamily("harmony_device_bytes_total", "Payload bytes of the step exchange and upload",
                                    labels=["device", "direction"])
        for (dev, direction), n in sorted(bytes_total.items()):
            moved.add_metric([dev, direction], n)
        yield moved
        counts, total = durations
        cumulative, buckets = 0, []
        for bound, n in zip([*DURATION_BUCKETS, float("inf")], counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        yield HistogramMetricFamily("harmony_session_duration_seconds", "Wall seconds of a finished session",
                                    buckets=buckets, sum_value=total)
        current = snap["current"]
        yield GaugeMetricFamily("harmony_current_round", "The round in progress (or the last one)",
                                value=current["round"] if current else 0)
        yield GaugeMetricFamily("harmony_rounds_total_planned", "Rounds the run plans (train.rounds)",
                                value=snap["run"].get("rounds") or 0)
        yield GaugeMetricFamily("harmony_devices_online", "Devices whose status is not offline",
                                value=snap["devices_online"])
        up = GaugeMetricFamily("harmony_stack_up", "1 when the stack's service is reachable from the monitor "
                               "(redis; broker when the monitor knows it: --stack)", labels=["component"])
        for component, reachable in sorted(snap["components"].items()):
            up.add_metric([component], 1.0 if reachable else 0.0)
        yield up
        yield from self._device_gauges(snap["devices"])
        yield from self._round_gauges(snap["rounds"])

    @staticmethod
    def _device_gauges(devices: list[dict[str, Any]]) -> Iterator[Metric]:
        depth = GaugeMetricFamily("harmony_device_split_depth", "Split depth of each device", labels=["device"])
        step = GaugeMetricFamily("harmony_device_step_seconds", "Seconds per step of the device's last session",
                                 labels=["device"])
        online = GaugeMetricFamily("harmony_device_online", "1 when the device is online", labels=["device"])
        for d in devices:
            if d["split_depth"] is not None:
                depth.add_metric([d["device"]], d["split_depth"])
            if d["step_s"] is not None:
                step.add_metric([d["device"]], d["step_s"])
            online.add_metric([d["device"]], 1.0 if d["online"] else 0.0)
        yield from (depth, step, online)

    @staticmethod
    def _round_gauges(rounds: list[dict[str, Any]]) -> Iterator[Metric]:
        done = [r["record"] for r in rounds if r.get("record")]
        acc = GaugeMetricFamily("harmony_round_accuracy_percent", "Train accuracy of the last finished round",
                                labels=["head"])
        loss = GaugeMetricFamily("harmony_round_loss", "Train loss of the last finished round", labels=["head"])
        if done:
            last = done[-1]
            for head in ("exit", "server"):
                if last.get(f"train_acc_{head}") is not None:
                    acc.add_metric([head], 100.0 * float(last[f"train_acc_{head}"]))
                if last.get(f"train_loss_{head}") is not None:
                    loss.add_metric([head], float(last[f"train_loss_{head}"]))
        yield from (acc, loss)


def registry_for(state: MonitorState) -> CollectorRegistry:
    """A registry holding only this state's metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StateCollector(state))
    return registry
