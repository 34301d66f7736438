"""FedUp: serverless ring federated learning.

This module is the public library API; what it does not export may change.
"""

import importlib
from typing import TYPE_CHECKING, Any

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import (
    ConfigError,
    FedupError,
    FileError,
    IdentityError,
    LocalProtocolError,
    RemoteProtocolError,
)
from fedup.identity import Identity, default_state_dir, load_or_create_identity
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address
from fedup.protocol.view import RunSettings

if TYPE_CHECKING:
    from fedup.learn.new_rows import RowReport
    from fedup.learn.predict import ModelError, Predictions, SavedModel, load_model, predict
    from fedup.learn.task import EvalStats, TabularTask, Task, TensorTask, TrainBudget, TrainStats
    from fedup.peer import (
        FixedTaskSource,
        FormationError,
        Peer,
        PeerConfig,
        RunError,
        RunSummary,
        TabularSource,
        TaskSource,
    )
    from fedup.sim.world import MemoryWorld

# What needs torch is imported on first use, so that `fedup-peer id` or `peers`
# (and anything else that only imports fedup) does not pay a second for torch.
_TASK_NAMES = ("EvalStats", "TabularTask", "Task", "TensorTask", "TrainBudget", "TrainStats")
_PEER_NAMES = (
    "FixedTaskSource",
    "FormationError",
    "Peer",
    "PeerConfig",
    "RunError",
    "RunSummary",
    "TabularSource",
    "TaskSource",
)
_PREDICT_NAMES = ("ModelError", "Predictions", "SavedModel", "load_model", "predict")
_LAZY = {
    **dict.fromkeys(_PREDICT_NAMES, "fedup.learn.predict"),
    "RowReport": "fedup.learn.new_rows",
    **dict.fromkeys(_TASK_NAMES, "fedup.learn.task"),
    **dict.fromkeys(_PEER_NAMES, "fedup.peer"),
    "MemoryWorld": "fedup.sim.world",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedup' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LIMITS",
    "Address",
    "ConfigError",
    "EvalStats",
    "FedupError",
    "FileError",
    "FixedTaskSource",
    "FormationError",
    "Identity",
    "IdentityError",
    "Limits",
    "LocalProtocolError",
    "MemoryWorld",
    "ModelError",
    "Peer",
    "PeerConfig",
    "PeerId",
    "Predictions",
    "RemoteProtocolError",
    "RowReport",
    "RunError",
    "RunSettings",
    "RunSummary",
    "SavedModel",
    "TabularSource",
    "TabularTask",
    "Task",
    "TaskSource",
    "TensorTask",
    "TrainBudget",
    "TrainStats",
    "__version__",
    "default_state_dir",
    "load_model",
    "load_or_create_identity",
    "predict",
]
