"""What the federation sends, counted where Flower sends it: every message the ServerApp
exchanges through its Grid, as the protobuf bytes Flower's wire format gives it (gRPC framing
and TLS not counted), per client and round."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WireCount:
    up: int = 0  # replies: client -> server
    down: int = 0  # instructions: server -> client
    messages: int = 0
    round: int = 1  # the round under way; the server moves it on when it evaluates a round's result
    participations: set = field(default_factory=set)  # (round, node) pairs that sent something

    def per_client_round(self) -> dict:
        n = max(1, len(self.participations))
        return {"wire_bytes_up_per_client_round": round(self.up / n),
                "wire_bytes_down_per_client_round": round(self.down / n),
                "wire_messages_per_client_round": round(self.messages / n, 2)}


def message_bytes(msg) -> int:
    from flwr.common.serde import message_to_proto

    return int(message_to_proto(msg).ByteSize())


class CountingGrid:
    """A Grid that counts the bytes of what passes through `send_and_receive` (what Flower's
    strategies and its SecAgg+ workflow use) and hands everything else to the real Grid."""

    def __init__(self, grid, count: WireCount) -> None:
        self._grid, self._count = grid, count

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        for m in messages:
            self._count.down += message_bytes(m)
            self._count.messages += 1
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        for r in replies:
            self._count.up += message_bytes(r)
            self._count.participations.add((self._count.round, r.metadata.src_node_id))
        return replies
