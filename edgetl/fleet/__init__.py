"""Federated transfer learning of the tiny parts with Flower (host side): `edgetl fleet ...`."""
from .partition import parse_partition, partition, write_shards
from .privacy import Privacy
from .simulate import full_model_bytes, simulate, upload_bytes

__all__ = ["Privacy", "full_model_bytes", "parse_partition", "partition", "simulate", "upload_bytes", "write_shards"]
