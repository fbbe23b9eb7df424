"""Server side of the distributed runtime: the Celery app (``server.app``), its tasks (``server.tasks``:
per-(device, round) sessions, aggregation, fallback inference) and the Redis state layout (``server.state``)."""
