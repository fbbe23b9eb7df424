"""Watching a run: ``harmony monitor`` (a terminal view) and ``harmony monitor --web`` (a live
dashboard with Prometheus ``/metrics``), fed by a running stack's Redis or by a run directory.

- :mod:`testbed.monitor.runlog`  the run directory's event log ``OUT/events.jsonl`` (written by ``harmony run``);
- :mod:`testbed.monitor.state`   one :class:`~testbed.monitor.state.MonitorState` folding events into a snapshot;
- :mod:`testbed.monitor.sources` where events come from: Redis (the ``hsfl:events`` stream and the registry
  hashes, read only) or a run directory (``events.jsonl`` tailed, ``results.json``);
- :mod:`testbed.monitor.web`     the Starlette app (page, server-sent events, ``/metrics``);
- :mod:`testbed.monitor.terminal` the Rich live view.

The monitor holds no client sample or label: only what the devices and the server side report
(timings, byte counts, losses and accuracies of the round records)."""
