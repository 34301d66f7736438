"""Differential privacy for one member's hops: DP-SGD with Opacus, opt-in and local.

A member that sets a :class:`DpBudget` (ε, δ and a clipping norm) trains every hop
with DP-SGD: each step samples its rows at random (Poisson sampling, rate
``q = batch_size / n_train``), computes every row's gradient (Opacus'
:class:`~opacus.GradSampleModule` on the hop's model), clips each to the norm
``clip``, sums them, adds Gaussian noise of standard deviation
``noise_multiplier × clip`` and hands the mean to the federation's optimizer
(Opacus' :class:`~opacus.optimizers.DPOptimizer` around it: Adam's state keeps the
layout that travels).  Each hop wraps the model afresh and removes every hook and
per-sample attribute when it ends, so nothing leaks from one hop to the next.

**Planning.** The noise multiplier is chosen once, when the member first builds its
task, by Opacus' RDP accountant: the smallest one for which the run's *planned*
steps spend at most ε (at δ).  The plan is the most the run can ask of this member:
``max_laps × ceil(local_epochs × n_train / batch_size)`` steps at rate ``q`` (in
the hybrid mode ``max_laps × sync_laps`` hops: ``RunSettings.member_hops``).  A
run that converges before ``max_laps`` spends less; a smaller ``--max-laps`` buys
less noise per step.

**Accounting.** :class:`PrivateTraining` keeps the accountant; it lives in the member
(its task source) and never travels: neither the budget nor the spent ε is in the
view, the ring state or the model digest, so members with and without DP, or with
different budgets, federate together.  Before a hop trains ``steps`` steps it asks
the accountant what ε those steps would bring the total to; beyond the budget the
hop trains nothing and the member hands the model on as it received it (its hop
trains 0 samples).  The spent ε therefore never exceeds the budget.

**Randomness.** The rows sampled and the noise come from a generator seeded from the
operating system's randomness (:mod:`secrets`), not from the run seed that every
member knows: a member that could recompute the noise could subtract it.  So a DP
hop is not reproducible, unlike a non-private one.  (Opacus' ``secure_mode``, which
also defends against floating-point attacks on the noise, is not used.)
"""

from __future__ import annotations

import copy
import functools
import math
import secrets
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import attrs

from fedup.errors import FedupError

if TYPE_CHECKING:  # torch and Opacus load when a member trains, not when options parse
    import torch
    from opacus.accountants import RDPAccountant
    from torch import nn

__all__ = [
    "DEFAULT_CLIP",
    "MAX_CLIP",
    "MAX_DELTA",
    "MAX_EPSILON",
    "DpBudget",
    "DpError",
    "PrivateTraining",
]

DEFAULT_CLIP: Final = 5.0
"""The per-row clipping norm when a member names none.  Measured (docs/quality.md, the
demo's 3 lenders, ε 8): a clip of 1 cost 0.15 to 0.19 of union AUC, 5 cost 0.006 to 0.010
(3 seeds), 10 and 20 a little more than 5 (one seed): clipping every row to 1 weighs the
rare defaults down more than the noise does, and the noise grows with the clip (σ·clip)."""
MAX_EPSILON: Final = 100.0
"""Largest ε accepted: beyond it the guarantee means nothing (e^100)."""
MAX_CLIP: Final = 1e6
"""Largest clipping norm accepted (a finite bound: no clipping is no privacy)."""
MAX_DELTA: Final = 0.1
"""Largest δ accepted: δ must be far below 1/rows to mean anything; 0.1 is a loose cap."""


class DpError(FedupError, ValueError):
    """A DP budget that cannot be used (one line: the value and the fix)."""


@attrs.frozen
class DpBudget:
    """A member's privacy budget for the whole run: (ε, δ) and the per-row clipping norm."""

    epsilon: float
    delta: float
    clip: float = DEFAULT_CLIP

    def __attrs_post_init__(self) -> None:
        problem = budget_problem(self.epsilon, self.delta, self.clip)
        if problem is not None:
            raise DpError(problem)


def budget_problem(epsilon: float, delta: float, clip: float) -> str | None:
    """Why ``(epsilon, delta, clip)`` is not a usable budget, or None."""
    if not (math.isfinite(epsilon) and 0 < epsilon <= MAX_EPSILON):
        return f"DP epsilon must be in (0, {MAX_EPSILON:g}] (got {epsilon})"
    if not (math.isfinite(delta) and 0 < delta <= MAX_DELTA):
        return f"DP delta must be in (0, {MAX_DELTA:g}] (got {delta})"
    if not (math.isfinite(clip) and 0 < clip <= MAX_CLIP):
        return f"DP clip must be in (0, {MAX_CLIP:g}] (got {clip})"
    return None


PerSampleLoss = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


class PrivateTraining:
    """One member's DP-SGD: its budget, its accountant and its noise multiplier.

    Made once per member (by its task source) and kept for the whole run, so the
    accountant counts every hop the member trains, whatever task it builds."""

    def __init__(self, budget: DpBudget) -> None:
        """Raises :class:`DpError` when Opacus is not installed."""
        try:
            from opacus.accountants import RDPAccountant
        except ImportError:
            raise DpError("differential privacy needs Opacus: pip install 'fedup[dp]'") from None
        self.budget = budget
        self.accountant = RDPAccountant()
        self.noise_multiplier: float | None = None
        self.sample_rate: float = 1.0
        self.planned_steps = 0
        self.steps_taken = 0
        self.hops_refused = 0

    def plan(self, *, n_train: int, batch_size: int, hop_epochs: float, max_laps: int) -> None:
        """Choose the noise multiplier for the run's planned steps (once: later calls,
        e.g. for a new view, keep it; the budget check still bounds the spending)."""
        if self.noise_multiplier is not None or n_train == 0:
            return
        self.sample_rate = min(1.0, batch_size / n_train)
        per_hop = math.ceil(hop_epochs * n_train / batch_size)
        self.planned_steps = max(1, max_laps * per_hop)
        self.noise_multiplier = _noise_multiplier(
            self.budget.epsilon, self.budget.delta, self.sample_rate, self.planned_steps
        )

    @property
    def epsilon_spent(self) -> float:
        """ε spent so far (at the budget's δ); 0 before any step."""
        if not self.accountant.history:
            return 0.0
        return _epsilon(self.accountant, self.budget.delta)

    def allows(self, steps: int) -> bool:
        """Whether ``steps`` more steps keep the spent ε within the budget."""
        if self.noise_multiplier is None or steps <= 0:
            return False
        trial = copy.deepcopy(self.accountant)
        _charge(trial, self.noise_multiplier, self.sample_rate, steps)
        return _epsilon(trial, self.budget.delta) <= self.budget.epsilon

    def report(self) -> dict[str, Any]:
        """What ``summary.json`` and the logs say: ε spent, δ, noise multiplier, clip."""
        return {
            "epsilon_spent": self.epsilon_spent,
            "epsilon": self.budget.epsilon,
            "delta": self.budget.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip": self.budget.clip,
            "sample_rate": self.sample_rate,
            "planned_steps": self.planned_steps,
            "steps": self.steps_taken,
            "hops_refused": self.hops_refused,
        }

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        steps: int,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: PerSampleLoss,
        batch_size: int,
        class_weights: tuple[float, float] | None,
    ) -> tuple[int, int, float]:
        """Take ``steps`` DP-SGD steps on ``(x, y)`` if the budget allows; returns
        ``(steps, samples, loss_sum)`` (all 0 when the budget is spent).  The steps are
        charged to the accountant before training, so a hop that fails is counted."""
        if self.noise_multiplier is None:
            raise DpError("DP training was not planned: call PrivateTraining.plan before the run")
        if not self.allows(steps):
            self.hops_refused += 1
            return 0, 0, 0.0
        import torch
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        _charge(self.accountant, self.noise_multiplier, self.sample_rate, steps)
        self.steps_taken += steps
        rng = torch.Generator().manual_seed(secrets.randbits(63))
        noise_rng = torch.Generator(device=x.device).manual_seed(secrets.randbits(63))
        private = GradSampleModule(model, loss_reduction="mean")
        dp = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.budget.clip,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=noise_rng,
        )
        total = 0.0
        samples = 0
        try:
            private.train()
            for _ in range(steps):
                pick = torch.rand(len(x), generator=rng) < self.sample_rate
                idx = pick.nonzero().reshape(-1).to(x.device)
                dp.zero_grad(set_to_none=True)
                if len(idx) == 0:
                    continue  # an empty Poisson batch: the step is charged, nothing moves
                xb, yb = x[idx], y[idx]
                per = loss_fn(private(xb), yb)
                if class_weights is not None:
                    w_neg, w_pos = class_weights
                    per = per * torch.where(yb > 0.5, w_pos, w_neg)
                total += float(per.detach().sum())
                samples += len(idx)
                with warnings.catch_warnings():  # Opacus' hooks on a first layer: benign
                    warnings.filterwarnings("ignore", "Full backward hook is firing")
                    per.mean().backward()  # type: ignore[no-untyped-call]
                dp.step()
            dp.zero_grad(set_to_none=True)
        finally:
            private.cleanup()  # hooks and per-sample attributes: none survive the hop
        return steps, samples, total


OPTIMAL_ORDER_WARNING: Final = "Optimal order is the largest alpha"
"""Opacus warns so when a few steps at a large ε would be bounded tighter by larger RDP
orders: the ε it reports is then an over-estimate (conservative), never an under-estimate."""


@functools.lru_cache(maxsize=16)
def _noise_multiplier(epsilon: float, delta: float, q: float, steps: int) -> float:
    """Opacus' smallest σ for which ``steps`` steps at rate ``q`` spend at most ε at δ
    (a search over σ, each try a full RDP computation: done once per plan)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", OPTIMAL_ORDER_WARNING)
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps,
                accountant="rdp",
            )
        )  # fmt: skip


def _epsilon(accountant: RDPAccountant, delta: float) -> float:
    """The ε of ``accountant``'s history at ``delta``: Opacus' own computation
    (``RDPAccountant.get_privacy_spent`` at its default orders), with the RDP of one step
    at each ``(σ, q)`` computed once: the RDP of ``n`` steps is ``n`` times it."""
    import numpy as np
    from opacus.accountants.analysis import rdp as analysis

    orders = accountant.DEFAULT_ALPHAS
    total = sum(np.asarray(_rdp_per_step(s, q)) * n for s, q, n in accountant.history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", OPTIMAL_ORDER_WARNING)
        eps, _ = analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=64)
def _rdp_per_step(sigma: float, q: float) -> tuple[float, ...]:
    """The RDP of one sampled Gaussian step at every default order (the slow part of
    Opacus' accounting; a member asks it before every hop at the same ``(σ, q)``)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    return tuple(analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders))


def _charge(accountant: RDPAccountant, sigma: float, q: float, steps: int) -> None:
    """Add ``steps`` steps at noise ``sigma`` and rate ``q`` to ``accountant`` (one
    history entry per run of equal steps, as Opacus merges them)."""
    if steps <= 0:
        return
    hist = accountant.history
    if hist and hist[-1][0] == sigma and hist[-1][1] == q:
        hist[-1] = (sigma, q, hist[-1][2] + steps)
    else:
        hist.append((sigma, q, steps))
