"""The on-device agent (docs/design.md §2): resource probe, the client side of every algorithm over MQTT,
personalisation, reconnect and resume. Entry points: ``harmony agent`` and ``python -m edge_agent``."""
