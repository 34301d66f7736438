"""One hop of ring training: what travels, what a peer does with it, when to stop.

The federation passes one :class:`RingState` around the ring.  It is an
ordered ``name -> torch.Tensor`` dict (so :mod:`fedup.learn.weights` can carry
it as a blob, no pickle) and a small :class:`RingMeta` of plain values (CBOR
or JSON).  The tensors, by prefix:

``model.*``  the weights being trained (the trajectory)
``optim.*``  the optimizer's state (Adam's moments and step), so optimisation
             is continuous across peers instead of restarting at every hop
``avg.*``    running average of the models that ended each hop of this lap
``cand.*``   the *candidate*: the previous lap's output, being evaluated
``best.*``   the candidate with the lowest federated validation loss so far

What a peer does in :func:`train_hop` (lap ``L``, ring position ``hop``):

1. If the state comes from lap ``L - 1`` (this is the lap's first hop), the
   previous lap is *closed*: the candidate's federated validation loss is
   complete; it becomes ``best`` if lower; the convergence rule is applied;
   and the finished lap's average becomes the new candidate.
2. The peer evaluates the candidate on its validation split and adds the
   sums (loss, count, correct, score histograms) to the metadata, masked
   (:mod:`fedup.learn.lap_sums`): the lap's first hop starts them from a
   random mask that only it removes when it closes the lap.
3. The peer trains ``model.*`` for ``hop_epochs`` passes over its own data
   (so steps are proportional to its data size), with the optimizer state
   received, a loss weighted so its label mix counts as the federation's,
   and a seed derived from (run seed, lap, hop).
4. The trained model is folded into ``avg.*`` with weight = samples trained.

**Federated validation loss of lap L**: the output of lap L (the
sample-weighted average of the models at the end of each hop of lap L) is
evaluated during lap L + 1 by every peer on its own validation split; the
loss is ``sum of all peers' validation loss sums / sum of their validation
sizes``, i.e. the mean binary cross-entropy over the union of the
validation splits.  The lap before any training (``lap = -1``) is the
initial model.

**Convergence**: a lap *improves* when its federated validation loss is
below ``(1 - tolerance)`` times the best loss at the last improvement.
Training stops when ``patience`` consecutive evaluated laps did not improve,
or after ``max_laps`` training laps (then lap ``max_laps`` only evaluates).
The final model is ``best.*`` (:func:`final_weights`): the evaluated lap
output with the lowest federated validation loss, which every peer receives.

**Devices**: a :class:`RingState`'s tensors are always CPU tensors.  A hop loads
them into the task's model on the task's device (:attr:`Task.device
<fedup.learn.task.Task.device>`), trains there, and copies the trained weights and
optimizer state back to the CPU; closing a lap and averaging happen on the CPU.
So what travels and what is saved is the same whatever device trained it.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

import attrs
import torch
from torch import nn

from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.learn.adam import Adam
from fedup.learn.lap_sums import (
    PACKED_SIZE,
    SUMS_LEN,
    ZERO_SUMS,
    LapMasks,
    add_sums,
    open_sums,
    pack_sums,
    to_sums,
    unpack_sums,
)
from fedup.learn.task import EvalStats, Task, TrainBudget, seeded
from fedup.protocol import cbor
from fedup.protocol.laps import HISTORY_WINDOW, LapRecord, Progress, StopState
from fedup.protocol.schema import FieldReader, MessageError
from fedup.protocol.view import SETTINGS_BOUNDS, RunSettings, settings_problem

__all__ = [
    "FederationStats",
    "HopMetrics",
    "LapResult",
    "RingMeta",
    "RingSettings",
    "RingState",
    "RingStateError",
    "evaluate_state",
    "final_weights",
    "fresh_optimizer_state",
    "hop_budget",
    "initial_state",
    "label_weights",
    "load_optimizer",
    "optimizer_tensors",
    "train_hop",
]

META_VERSION: Final = 2
MAX_LAPS_CEILING: Final = int(SETTINGS_BOUNDS["max_laps"].hi)
"""Largest ``max_laps`` (the run settings' bound: one source)."""
MAX_HISTORY: Final = HISTORY_WINDOW
"""Lap results carried in the metadata (the most recent).  A member sees the model
every lap, so it only needs the one or two results closed since it last saw it to
check the stopping state (:mod:`fedup.protocol.custody_rules`); each member keeps the
whole history itself (``metrics.jsonl``, ``summary.json``).  64 cost about 1.3 ms of
CBOR and checking per hop; 8 cost a tenth of that."""


class RingStateError(RemoteProtocolError):
    """A ring state from a peer is malformed, inconsistent or out of order."""


@attrs.frozen
class RingSettings:
    """How the federation trains; every peer must use the same settings (see :meth:`digest`)."""

    seed: int = 0
    """Run seed: initial weights and every hop's randomness derive from it."""
    hop_epochs: float = 0.1
    """Passes over its own training data each peer makes per hop (so a lap is
    ``hop_epochs`` passes over the federation's data).  Small hops make the ring
    behave like minibatch training on the pooled data."""
    travel_optimizer: bool = True
    """Carry the optimizer state with the weights (else a fresh optimizer per hop)."""
    weight_labels: bool = False
    """Weight each peer's loss so its label mix counts as the federation's.  Off by
    default: with the other measures on it moves the model away from the pooled
    optimum (docs/learning.md has the numbers)."""
    max_class_weight: float = 10.0
    """Cap on those weights: a peer with almost no positives does not get huge gradients."""
    average_lap: bool = True
    """A lap's output is the average of its hops' models (else the last hop's model)."""
    keep_best: bool = True
    """The final model is the best lap's output (else the last evaluated lap's)."""
    prox_mu: float = 0.0
    """Proximal term toward the weights received (0 = off)."""
    tolerance: float = 1e-3
    """Relative improvement of the federated validation loss that counts."""
    patience: int = 20
    """Laps without such an improvement before stopping (20 laps of 0.1 = 2 data passes)."""
    max_laps: int = 1000
    """Training laps at most."""

    def __attrs_post_init__(self) -> None:
        problem = settings_problem(
            {
                "local_epochs": self.hop_epochs,
                "max_laps": self.max_laps,
                "patience": self.patience,
                "tolerance": self.tolerance,
                "seed": self.seed,
            }
        )
        if problem is not None:
            raise LocalProtocolError(f"{problem[0]} {problem[1]}")
        if self.prox_mu < 0:
            raise LocalProtocolError("prox_mu must be >= 0")
        if self.max_class_weight < 1:
            raise LocalProtocolError("max_class_weight must be >= 1")

    @classmethod
    def for_run(cls, run: RunSettings) -> RingSettings:
        """The settings every member derives from the run settings of the signed view."""
        return cls(
            seed=run.seed,
            hop_epochs=run.local_epochs,
            tolerance=run.tolerance,
            patience=run.patience,
            max_laps=run.max_laps,
        )

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, obj: object) -> RingSettings:
        """Build from an untrusted dict; raises :class:`RingStateError`."""
        try:
            r = FieldReader(obj, "ring settings")
            kw: dict[str, Any] = {}
            for f in attrs.fields(cls):
                if f.type in ("bool", bool):
                    kw[f.name] = r.boolean(f.name)
                elif f.type in ("int", int):
                    kw[f.name] = r.uint(f.name)
                else:
                    kw[f.name] = r.number(f.name)
            r.done()
            return cls(**kw)
        except (MessageError, LocalProtocolError) as e:
            raise RingStateError(str(e)) from None

    def digest(self) -> str:
        """SHA-256 (hex) of the settings' deterministic CBOR: peers compare it."""
        return hashlib.sha256(cbor.encode(self.to_dict())).hexdigest()


@attrs.frozen
class FederationStats:
    """Aggregate facts about the federation a hop needs (counts only, from the schema)."""

    n_peers: int
    n_rows: int
    n_positive: int

    @property
    def positive_rate(self) -> float:
        return self.n_positive / self.n_rows if self.n_rows else 0.0


LapResult = LapRecord
"""A lap's federated evaluation (:class:`fedup.protocol.laps.LapRecord`)."""


@attrs.frozen
class RingMeta:
    """The plain-value part of the state; validated by :meth:`from_dict` when received."""

    lap: int = -1
    """Lap of the last hop trained (-1: none yet)."""
    hop: int = -1
    """Ring position of the last hop trained."""
    samples: int = 0
    """Training samples processed by all hops so far."""
    avg_weight: int = 0
    """Samples behind ``avg.*`` (0: empty)."""
    cand_lap: int = -1
    """The lap whose output is in ``cand.*`` (-1: the initial model)."""
    cand_samples: int = 0
    """``samples`` at the end of ``cand_lap``."""
    cand_sums: tuple[int, ...] = ZERO_SUMS
    """Sums of the candidate's evaluation by the peers so far this lap, masked by the
    member that opened the lap (:mod:`fedup.learn.lap_sums`)."""
    best_lap: int = -2
    """The lap whose output is in ``best.*`` (-2: nothing evaluated yet)."""
    best_loss: float = math.inf
    ref_loss: float = math.inf
    """Best loss at the last improvement beyond the tolerance."""
    stale: int = 0
    """Evaluated laps since that improvement."""
    done: bool = False
    history: tuple[LapResult, ...] = ()
    """The most recent :data:`MAX_HISTORY` evaluated laps, oldest first."""

    @property
    def stop(self) -> StopState:
        return StopState(self.best_lap, self.best_loss, self.ref_loss, self.stale)

    def progress(self) -> Progress:
        """What the custody machine checks: position, end flag, stopping state, history.

        The lap judged last is the one before the current candidate's (lap -2: none).
        """
        return Progress(self.lap, self.hop, self.done, self.cand_lap - 1, self.stop, self.history)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": META_VERSION,
            "lap": self.lap,
            "hop": self.hop,
            "samples": self.samples,
            "avg_weight": self.avg_weight,
            "cand_lap": self.cand_lap,
            "cand_samples": self.cand_samples,
            "cand_sums": pack_sums(self.cand_sums),
            "best_lap": self.best_lap,
            "best_loss": None if math.isinf(self.best_loss) else self.best_loss,
            "ref_loss": None if math.isinf(self.ref_loss) else self.ref_loss,
            "stale": self.stale,
            "done": self.done,
            "history": [
                [h.lap, h.loss, h.accuracy, None if math.isnan(h.auc) else h.auc, h.n, h.samples]
                for h in self.history
            ],
        }

    @classmethod
    def from_dict(cls, obj: object) -> RingMeta:
        """Build from an untrusted decoded dict; raises :class:`RingStateError`."""
        try:
            r = FieldReader(obj, "ring metadata")
            if r.uint("v") != META_VERSION:
                raise r.fail("v", f"must be {META_VERSION}")
            lap = _int(r, "lap", -1, MAX_LAPS_CEILING)
            hop = _int(r, "hop", -1, 2**16)
            samples = r.uint("samples", max_value=2**62)
            avg_weight = r.uint("avg_weight", max_value=2**62)
            cand_lap = _int(r, "cand_lap", -1, MAX_LAPS_CEILING)
            cand_samples = r.uint("cand_samples", max_value=2**62)
            cand_sums = _sums_from(r.raw("cand_sums"))
            best_lap = _int(r, "best_lap", -2, MAX_LAPS_CEILING)
            best_loss = _opt_float(r, "best_loss")
            ref_loss = _opt_float(r, "ref_loss")
            stale = r.uint("stale", max_value=MAX_LAPS_CEILING)
            done = r.boolean("done")
            history = r.array("history", _lap_result, max_items=MAX_HISTORY)
            r.done()
        except RingStateError:
            raise
        except MessageError as e:
            raise RingStateError(e.reason) from None
        return cls(
            lap, hop, samples, avg_weight, cand_lap, cand_samples, cand_sums, best_lap,
            best_loss, ref_loss, stale, done, tuple(history),
        )  # fmt: skip


def _int(r: FieldReader, key: str, lo: int, hi: int) -> int:
    v = r.raw(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise r.fail(key, f"must be an integer in [{lo}, {hi}]")
    return v


def _finite(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RingStateError(f"ring metadata: {what} must be a finite number")
    return float(v)


def _opt_float(r: FieldReader, key: str) -> float:
    v = r.raw(key)
    return math.inf if v is None else _finite(v, key)


def _sums_from(v: object) -> tuple[int, ...]:
    sums = unpack_sums(v) if isinstance(v, bytes) else None
    if sums is None:
        raise RingStateError(
            f"ring metadata: cand_sums must be {PACKED_SIZE} bytes: {SUMS_LEN} integers "
            "below 2^62, 8 bytes each"
        )
    return sums


def _lap_result(v: object, label: str) -> LapResult:
    if not isinstance(v, list) or len(v) != 6:
        raise RingStateError(f"{label}: must be a 6-item array")
    lap, loss, acc, auc, n, samples = v
    if isinstance(lap, bool) or not isinstance(lap, int) or not -1 <= lap <= MAX_LAPS_CEILING:
        raise RingStateError(f"{label}: bad lap")
    for x in (n, samples):
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 2**62:
            raise RingStateError(f"{label}: bad count")
    auc_f = math.nan if auc is None else _finite(auc, label)
    return LapResult(lap, _finite(loss, label), _finite(acc, label), auc_f, n, samples)


@attrs.frozen(eq=False)
class RingState:
    """Everything that travels: tensors by name (in a fixed order) and metadata."""

    tensors: dict[str, torch.Tensor]
    meta: RingMeta

    @classmethod
    def from_parts(
        cls, tensors: Mapping[str, torch.Tensor], meta: object, *, template: RingState
    ) -> RingState:
        """Rebuild a received state: ``meta`` is the decoded metadata dict, ``tensors``
        the decoded blob.  The tensors must have exactly ``template``'s names, order,
        dtypes and shapes (``template`` = :func:`initial_state` of the same task and
        settings).  Raises :class:`RingStateError`.
        """
        names = list(tensors)
        if names != list(template.tensors):
            want, got = set(template.tensors), set(names)
            raise RingStateError(
                "ring state: tensors differ from the expected layout "
                f"(missing {sorted(want - got)[:5]}, unexpected {sorted(got - want)[:5]})"
            )
        for k, t in tensors.items():
            ref = template.tensors[k]
            if t.dtype != ref.dtype or t.shape != ref.shape:
                raise RingStateError(
                    f"ring state: tensor {k!r} is {t.dtype} {tuple(t.shape)}, "
                    f"expected {ref.dtype} {tuple(ref.shape)}"
                )
        return cls(dict(tensors), RingMeta.from_dict(meta))

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix`` (e.g. ``"model."``) with the prefix removed."""
        return tensors_under(self.tensors, prefix)


def tensors_under(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (e.g. ``"model."``) with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@attrs.frozen
class HopMetrics:
    """What one hop did, for logs and the simulator."""

    lap: int
    hop: int
    steps: int
    samples: int
    train_loss: float
    candidate: EvalStats | None
    """This peer's evaluation of the candidate (None if the hop only closed the run)."""
    closed: LapResult | None
    """The lap closed at the start of this hop, if any."""
    improved: bool
    done: bool
    seconds: float


# --------------------------------------------------------------------------
# Building and reading states


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's index order (its state is keyed by index)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> Iterator[tuple[str, torch.Tensor]]:
    index_to_name = _param_names(model, optimizer)
    if _plain_adam(optimizer):
        # What ``state_dict()["state"]`` holds, read in place: its per-parameter dicts,
        # keyed by the parameter's index (the packing's param-group copies are not needed).
        params = [p for group in optimizer.param_groups for p in group["params"]]
        by_index = {i: optimizer.state[p] for i, p in enumerate(params) if p in optimizer.state}
    else:
        by_index = optimizer.state_dict()["state"]
    for idx in sorted(by_index):
        for key, value in sorted(by_index[idx].items()):
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            yield f"optim.{index_to_name[idx]}.{key}", _cpu_copy(t)


def load_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor]
) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    name_to_index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        pname, _, skey = key.rpartition(".")
        if pname not in name_to_index:
            raise RingStateError(f"ring state: optimizer state for unknown parameter {pname!r}")
        state.setdefault(name_to_index[pname], {})[skey] = t.clone()
    if _plain_adam(optimizer):
        # What ``load_state_dict`` makes of the same dict, without its deep copy of the
        # param groups (they are the optimizer's own): ``step`` kept as given, every
        # other tensor cast to its parameter's dtype and device.
        for i, values in state.items():
            p = params[i]
            optimizer.state[p] = {
                k: v if k == "step" else v.to(dtype=p.dtype, device=p.device)
                for k, v in values.items()
            }
        return
    sd = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


_OPTIMIZER_HOOKS: Final = (
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)
"""Where an optimizer keeps the hooks on its state dict (a torch without them: not plain)."""


def _plain_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is torch's Adam as :meth:`Task.make_optimizer
    <fedup.learn.task.Task.make_optimizer>` makes it (no hooks on its state dict, not
    fused or capturable, floating parameters), so its state can be read and written in
    place with the same result as ``state_dict`` and ``load_state_dict``."""
    return (
        type(optimizer) in (torch.optim.Adam, Adam)
        and not any(getattr(optimizer, name, True) for name in _OPTIMIZER_HOOKS)
        and all(not g.get("fused") and not g.get("capturable") for g in optimizer.param_groups)
        and all(p.is_floating_point() for g in optimizer.param_groups for p in g["params"])
    )


def fresh_optimizer_state(task: Task, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The optimizer state's layout with every tensor zero (Adam: no step taken yet)."""
    scratch = copy.deepcopy(model)
    opt = task.make_optimizer(scratch)
    for p in scratch.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return [(k, torch.zeros_like(v)) for k, v in optimizer_tensors(scratch, opt)]


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t`` on the CPU (a clone when it is there already)."""
    return t.detach().clone() if t.is_cpu else t.detach().cpu()


def _clone(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in state.items()}


def initial_state(task: Task, settings: RingSettings) -> RingState:
    """The state before lap 0: the initial model (from ``settings.seed``) as candidate.

    Built on the CPU (:meth:`Task.build_model <fedup.learn.task.Task.build_model>`),
    whatever the task's device.  Every peer computes the same initial state, and
    every later state has the same tensor names, dtypes and shapes, so
    ``initial_state(...).tensors`` is the ``like=`` template for decoding received
    blobs.
    """
    model = task.build_model(settings.seed)
    weights = {k: _cpu_copy(v) for k, v in model.state_dict().items()}
    tensors = _clone(weights, "model.")
    if settings.travel_optimizer:
        tensors.update(fresh_optimizer_state(task, model))
    if settings.average_lap:
        tensors.update({"avg." + k: torch.zeros_like(v) for k, v in weights.items()})
    tensors.update(_clone(weights, "cand."))
    if settings.keep_best:
        tensors.update(_clone(weights, "best."))
    return RingState(tensors, RingMeta())


def final_weights(state: RingState) -> dict[str, torch.Tensor]:
    """The model the federation ends with: ``best.*`` if kept and evaluated, else ``cand.*``."""
    best = state.group("best.")
    if best and state.meta.best_lap >= -1:
        return best
    return state.group("cand.")


def model_with(task: Task, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """A model of the task on its device holding ``weights`` (CPU tensors will do)."""
    return _fill(task.build_model(0).to(task.device), weights)


def _fill(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Put ``weights`` (every parameter and buffer) into ``model``, copied to the
    model's device.

    A model of plain modules (none with its own ``_load_from_state_dict`` or a load
    hook) whose state dict has exactly these names and shapes gets each tensor copied in
    place, as ``load_state_dict`` would copy it but without its walk and checks; any
    other goes through ``load_state_dict(strict=True)``, which says what does not fit.
    """
    if _plain_module(model):
        slots = model.state_dict(keep_vars=True)
        if slots.keys() == weights.keys() and all(
            t.shape == weights[k].shape for k, t in slots.items()
        ):
            with torch.no_grad():
                for k, t in slots.items():
                    t.copy_(weights[k])
            return model
    try:
        model.load_state_dict(dict(weights), strict=True)
    except RuntimeError as e:
        raise RingStateError(f"ring state does not fit the task's model: {e}") from None
    return model


_MODULE_HOOKS: Final = (
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
)
"""Where a module keeps the hooks on saving and loading its state."""


def _plain_module(model: nn.Module) -> bool:
    """Whether every module of ``model`` saves and loads its state as ``nn.Module`` does,
    with no hook on either."""
    base = nn.Module
    return all(
        type(m).load_state_dict is base.load_state_dict
        and type(m).state_dict is base.state_dict
        and type(m)._load_from_state_dict is base._load_from_state_dict
        and type(m)._save_to_state_dict is base._save_to_state_dict
        and not any(getattr(m, name, True) for name in _MODULE_HOOKS)
        for m in model.modules()
    )


def evaluate_state(task: Task, state: RingState) -> EvalStats:
    """Evaluate the state's final model (:func:`final_weights`) on the local validation split."""
    with task.scratch_model() as model:
        return task.evaluate(_fill(model, final_weights(state)))


def hop_seed(settings: RingSettings, lap: int, hop: int) -> int:
    """The seed of hop ``hop`` of lap ``lap``: 63 bits of SHA-256 of (run seed, lap, hop)."""
    data = f"fedup-hop:{settings.seed}:{lap}:{hop}".encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") >> 1


# --------------------------------------------------------------------------
# The hop


def _close_lap(
    task: Task,
    m: RingMeta,
    settings: RingSettings,
    tensors: dict[str, torch.Tensor],
    masks: LapMasks | None,
) -> tuple[RingMeta, LapResult | None, bool]:
    """Finish the lap that ended: judge the candidate, maybe stop, make the next candidate.

    Updates ``tensors`` in place (``best.*``, ``cand.*``).  The lap is judged only
    when this member can remove the mask it put on the lap's sums (it opened the
    lap; without ``masks`` the sums travel unmasked).
    """
    result = None
    improved = False
    stop = m.stop
    history = m.history
    mask = ZERO_SUMS if masks is None else masks.get(m.lap)
    slots = task.metrics is not None
    e = None if mask is None else open_sums(add_sums(m.cand_sums, mask, sign=-1), slots=slots)
    if e is not None:
        second, third = task.lap_figures(e)
        if not math.isfinite(second):  # a forged or diverged lap still closes
            second = 0.0
        result = LapResult(m.cand_lap, e.loss, second, third, e.n, m.cand_samples)
        history = (*history, result)[-MAX_HISTORY:]
        new_stop, improved = stop.judge(result, tolerance=settings.tolerance)
        if new_stop.best_lap != stop.best_lap and settings.keep_best:
            for k in [k for k in tensors if k.startswith("cand.")]:
                tensors["best." + k[5:]] = tensors[k].clone()
        stop = new_stop
    # Lap m.lap has ended: its output becomes the candidate evaluated during the next lap.
    done = stop.holds(judged_lap=m.cand_lap, patience=settings.patience, max_laps=settings.max_laps)
    if not done:
        if settings.average_lap and m.avg_weight > 0:
            source = "avg."
        else:
            source = "model."
        for k in [k for k in tensors if k.startswith(source)]:
            tensors["cand." + k[len(source) :]] = tensors[k].clone()
    meta = attrs.evolve(
        m, avg_weight=0, cand_lap=m.lap, cand_samples=m.samples, cand_sums=ZERO_SUMS,
        best_lap=stop.best_lap, best_loss=stop.best_loss, ref_loss=stop.ref_loss,
        stale=stop.stale, done=done, history=history,
    )  # fmt: skip
    return meta, result, improved


def hop_budget(
    task: Task, settings: RingSettings, fed: FederationStats, model: nn.Module, seed: int
) -> TrainBudget:
    """How one member trains ``model`` for a hop (or a parallel round) under ``settings``:
    ``hop_epochs`` of its data, the labels weighted by the federation's mix, and the
    proximal term's anchor (the parameters it starts from) when ``prox_mu`` is set."""
    anchor = None
    if settings.prox_mu > 0:
        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    return TrainBudget(
        epochs=settings.hop_epochs,
        seed=seed,
        class_weights=label_weights(task, settings, fed),
        prox_mu=settings.prox_mu,
        anchor=anchor,
    )


def label_weights(
    task: Task, settings: RingSettings, fed: FederationStats
) -> tuple[float, float] | None:
    """The loss weights of the negative and positive labels for ``task``'s training under
    ``settings.weight_labels`` (None: unweighted), from the federation's label mix."""
    if not settings.weight_labels or fed.n_rows == 0:
        return None
    counts = task.label_counts
    if counts is None:
        return None
    neg, pos = counts
    n = neg + pos
    if n == 0:
        return None
    p_fed, p_local = fed.positive_rate, pos / n
    cap = settings.max_class_weight
    w_pos = min(cap, p_fed / p_local) if p_local > 0 else 1.0
    w_neg = min(cap, (1 - p_fed) / (1 - p_local)) if p_local < 1 else 1.0
    return w_neg, w_pos


def train_hop(
    task: Task,
    state: RingState,
    settings: RingSettings,
    lap: int,
    hop: int,
    federation: FederationStats,
    *,
    train: bool = True,
    masks: LapMasks | None = None,
) -> tuple[RingState, HopMetrics]:
    """Do this peer's hop: close the previous lap if one ended, evaluate, train, accumulate.

    ``lap`` and ``hop`` are the lap number and this peer's ring position; a
    state must arrive in order (from the same lap with a smaller ``hop``, or
    from the previous lap).  The input state is not modified.  With the same
    inputs the output's tensors are bit-for-bit the same (on the same machine
    and thread count, training on the CPU; CUDA kernels may differ in the last
    bits from one run to the next); its masked validation sums are not (the mask is random)
    but open to the same totals.  Torch's global RNG (and a CUDA device's) is seeded
    for the hop inside ``torch.random.fork_rng``, so the caller's RNG state is left
    as it was.

    ``masks`` keeps the masks of the laps this member opens (one per member
    and run; None: the sums travel unmasked, as in-process baselines may).

    With ``train=False`` the hop only closes and evaluates (what a member
    hands on when its own training gave a bad state: the state it received,
    moved on to its position, see :func:`~fedup.learn.ring_payload.state_problem`).

    Returns the new state and the hop's metrics; when ``metrics.done`` is
    true the run has ended and the state was not trained: its final model
    (:func:`final_weights`) is the federation's result.

    Raises :class:`RingStateError` if the state is out of order, already
    done, or does not fit the task's model.
    """
    start = time.perf_counter()
    m = state.meta
    if m.done:
        raise RingStateError("ring state: the run has already ended")
    if not (lap == m.lap and hop > m.hop) and lap != m.lap + 1:
        raise RingStateError(
            f"ring state from lap {m.lap} hop {m.hop} cannot be trained at lap {lap} hop {hop}"
        )
    tensors = {k: v.clone() for k, v in state.tensors.items()}
    closed = None
    improved = False
    if lap != m.lap and m.lap >= 0:
        m, closed, improved = _close_lap(task, m, settings, tensors, masks)
        if m.done:
            metrics = HopMetrics(
                lap, hop, 0, 0, math.nan, None, closed, improved, True,
                time.perf_counter() - start,
            )  # fmt: skip
            return RingState(tensors, m), metrics

    seed = hop_seed(settings, lap, hop)
    with task.scratch_model() as model:
        with seeded(seed, task.device):
            # One module: it evaluates the candidate, then takes the weights to train.
            _fill(model, tensors_under(tensors, "cand."))
            cand_eval = task.evaluate(model)
            _fill(model, tensors_under(tensors, "model."))
            steps = samples = 0
            loss_sum = 0.0
            if train and lap < settings.max_laps:  # lap max_laps only evaluates
                optimizer = task.make_optimizer(model)
                if settings.travel_optimizer:
                    load_optimizer(model, optimizer, tensors_under(tensors, "optim."))
                budget = hop_budget(task, settings, federation, model, seed)
                stats = task.train(model, optimizer, budget)
                steps, samples, loss_sum = stats.steps, stats.samples, stats.loss_sum
                if settings.travel_optimizer:
                    for k, v in optimizer_tensors(model, optimizer):
                        if k not in tensors:
                            raise LocalProtocolError(f"the optimizer made a new tensor {k!r}")
                        tensors[k] = v.to(tensors[k].dtype)
        weights = {k: _cpu_copy(v) for k, v in model.state_dict().items()}
    for k, v in weights.items():
        tensors["model." + k] = v
    avg_weight = m.avg_weight
    if settings.average_lap and samples > 0:
        avg_weight += samples
        frac = samples / avg_weight
        for k, v in weights.items():
            a = tensors["avg." + k]
            if a.is_floating_point():
                tensors["avg." + k] = a + frac * (v.detach() - a)
            else:
                tensors["avg." + k] = v.detach().clone()
    if lap != m.lap:  # this hop opens the lap: its sums start from our mask
        base = masks.open(lap) if masks is not None else ZERO_SUMS
    else:
        base = m.cand_sums
    try:
        own = to_sums(cand_eval)
    except ValueError as e:
        raise LocalProtocolError(f"our evaluation cannot be summed: {e}") from None
    meta = attrs.evolve(
        m, lap=lap, hop=hop, samples=m.samples + samples, avg_weight=avg_weight,
        cand_sums=add_sums(base, own),
    )  # fmt: skip
    metrics = HopMetrics(
        lap, hop, steps, samples, loss_sum / samples if samples else math.nan, cand_eval,
        closed, improved, False, time.perf_counter() - start,
    )  # fmt: skip
    return RingState(tensors, meta), metrics
