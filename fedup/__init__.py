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
from fedup.protocol.peer_id import PeerId

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LIMITS",
    "ConfigError",
    "FedupError",
    "Identity",
    "IdentityError",
    "Limits",
    "LocalProtocolError",
    "PeerId",
    "RemoteProtocolError",
    "__version__",
    "default_state_dir",
    "load_or_create_identity",
]
