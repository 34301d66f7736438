"""A running FedUp peer: listener, discovery, formation and ring training, composed."""

from fedup.peer.config import PeerConfig
from fedup.peer.formation import FormationError
from fedup.peer.node import MemoryWorld, Peer
from fedup.peer.outputs import RunSummary
from fedup.peer.source import FixedTaskSource, TabularSource, TaskSource
from fedup.peer.training import RunError

__all__ = [
    "FixedTaskSource",
    "FormationError",
    "MemoryWorld",
    "Peer",
    "PeerConfig",
    "RunError",
    "RunSummary",
    "TabularSource",
    "TaskSource",
]
