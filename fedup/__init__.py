"""FedUp: serverless ring federated learning.

This module is the public library API; what it does not export may change.
"""

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import (
    ConfigError,
    FedupError,
    IdentityError,
    LocalProtocolError,
    RemoteProtocolError,
)
from fedup.identity import Identity, default_state_dir, load_or_create_identity
from fedup.learn.task import EvalStats, TabularTask, Task, TensorTask, TrainBudget, TrainStats
from fedup.peer import (
    FixedTaskSource,
    FormationError,
    MemoryWorld,
    Peer,
    PeerConfig,
    RunError,
    RunSummary,
    TabularSource,
    TaskSource,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address
from fedup.protocol.view import RunSettings

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LIMITS",
    "Address",
    "ConfigError",
    "EvalStats",
    "FedupError",
    "FixedTaskSource",
    "FormationError",
    "Identity",
    "IdentityError",
    "Limits",
    "LocalProtocolError",
    "MemoryWorld",
    "Peer",
    "PeerConfig",
    "PeerId",
    "RemoteProtocolError",
    "RunError",
    "RunSettings",
    "RunSummary",
    "TabularSource",
    "TabularTask",
    "Task",
    "TaskSource",
    "TensorTask",
    "TrainBudget",
    "TrainStats",
    "__version__",
    "default_state_dir",
    "load_or_create_identity",
]
