"""fedup.learn.adam: torch's Adam, the same bit for bit, without importing torch's compiler."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

from fedup.learn.adam import Adam


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def train(net: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    data = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(16, 6, generator=data)).square().mean().backward()
        opt.step()


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize(
    "options", [{"lr": 1e-3}, {"lr": 0.05, "weight_decay": 0.01}, {"lr": 0.01, "amsgrad": True}]
)
def test_the_steps_and_the_state_are_torchs_bit_for_bit(options: dict[str, Any]) -> None:
    ours_net, torchs_net = model(1), model(1)
    ours, torchs = (
        Adam(ours_net.parameters(), **options),
        torch.optim.Adam(torchs_net.parameters(), **options),
    )
    train(ours_net, ours, 7, seed=2)
    train(torchs_net, torchs, 7, seed=2)
    assert same(ours_net.state_dict(), torchs_net.state_dict())
    assert same(ours.state_dict(), torchs.state_dict())
    # A state saved by one loads into the other and goes on the same.
    again = model(9)
    again.load_state_dict(torchs_net.state_dict())
    loaded = Adam(again.parameters(), **options)
    loaded.load_state_dict(copy.deepcopy(torchs.state_dict()))  # torch's load shares them
    train(again, loaded, 3, seed=3)
    train(torchs_net, torchs, 3, seed=3)
    assert same(again.state_dict(), torchs_net.state_dict())


def test_step_hooks_run_and_gradients_are_on_again_after_a_step() -> None:
    net = model(1)
    opt = Adam(net.parameters())
    seen: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    train(net, opt, 2, seed=0)  # an in-place step with gradients on would raise
    assert seen == ["pre", "post", "pre", "post"]
    assert torch.is_grad_enabled()


def test_training_a_peers_hop_never_imports_torchs_compiler() -> None:
    # In a fresh interpreter: the built-in task's optimizer, a hop and an evaluation.
    script = textwrap.dedent(
        """
        import sys
        import torch
        from fedup.learn import baselines, loans
        from fedup.learn.ring import RingSettings, initial_state, train_hop, evaluate_state
        tables = [d.table for d in loans.generate_population(2, seed=5, n_rows=200)]
        task = baselines.make_tasks(tables)[0]
        settings = RingSettings(seed=1, hop_epochs=0.5)
        state, _ = train_hop(task, initial_state(task, settings), settings, 0, 0,
                             baselines.federation_of([task]))
        evaluate_state(task, state)
        print("torch._dynamo" in sys.modules, "exp_avg" in str(sorted(state.tensors)))
        """
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == ["False", "True"]
