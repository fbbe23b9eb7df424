"""The wire layer of the distributed runtime (docs/design.md §2, §5): topics, schemas, codec, MQTT, Mosquitto.

Modules: ``topics`` (topic names and parser), ``schemas`` (one dataclass schema per message kind),
``codec`` (msgpack envelopes, tensor ext type 84), ``blobs`` (chunked, hash-addressed weights),
``dedup`` (QoS 1 seq de-duplication), ``client`` (paho-mqtt v2 wrapper), ``mosquitto`` (broker
config, passwords, ACL, process). Import what you need from the module; this package imports only
the error types so that ``import broker.topics`` stays light.
"""

from broker.errors import BrokerError, ConnectRefused, PublishDenied, SubscribeDenied, WireError

__all__ = ["BrokerError", "ConnectRefused", "PublishDenied", "SubscribeDenied", "WireError"]
