"""Orchestrator (docs/design.md §2): device registry, round state machine on Redis, the distributed round
driver (``orchestrator.engine.DistributedEngine``) and the long-running registry service
(``python -m orchestrator``)."""
