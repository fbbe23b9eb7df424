"""The agent process's logging: the accepted ``--log-level`` values and the one set-up call.

Light on purpose (``logging`` only), so that ``harmony``'s command line can validate the option
without importing torch or paho.
"""

from __future__ import annotations

import logging

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_log_level(text: str) -> str:
    """``text`` as one of ``LOG_LEVELS`` (any case); ``ValueError`` naming the allowed values otherwise."""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def configure_logging(level: str) -> None:
    """Log records at ``level`` and above to stderr with timestamps.

    Replaces any earlier set-up of the root logger (``force``): ``harmony``'s own ``main`` configures
    WARNING before it dispatches to ``harmony agent``, and a second plain ``basicConfig`` would be a
    no-op, leaving the agent at WARNING whatever ``--log-level`` said.
    """
    logging.basicConfig(level=parse_log_level(level), format=LOG_FORMAT, force=True)
