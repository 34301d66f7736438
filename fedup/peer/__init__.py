"""A running FedUp peer: listener, discovery, formation and custody, composed."""

from fedup.peer.config import PeerConfig
from fedup.peer.custody_driver import RunError
from fedup.peer.events import EventHub, PeerEvent
from fedup.peer.formation_driver import FormationError
from fedup.peer.node import Environment, Peer
from fedup.peer.outputs import RunSummary
from fedup.peer.source import FixedTaskSource, TabularSource, TaskSource

__all__ = [
    "Environment",
    "EventHub",
    "FixedTaskSource",
    "FormationError",
    "Peer",
    "PeerConfig",
    "PeerEvent",
    "RunError",
    "RunSummary",
    "TabularSource",
    "TaskSource",
]
