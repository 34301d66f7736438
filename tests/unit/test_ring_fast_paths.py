"""A hop moves weights and Adam's state in place: the same numbers as torch's own paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedup.learn.ring import (
    RingStateError,
    _fill,
    _plain_adam,
    _plain_module,
    load_optimizer,
    optimizer_tensors,
)
from fedup.learn.task import mlp


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(7, (5, 3))


def _trained(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = torch.randn(16, 7, generator=gen)
        optimizer.zero_grad()
        model(x).square().mean().backward()  # type: ignore[no-untyped-call]
        optimizer.step()


def _generic_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer state as ``state_dict()`` gives it, named as the ring names it."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()["state"]
    return {f"optim.{order[i]}.{k}": v for i in sorted(sd) for k, v in sorted(sd[i].items())}


def test_fill_copies_into_the_same_parameters_as_load_state_dict() -> None:
    weights = _model(1).state_dict()
    fast, slow = _model(2), _model(2)
    params = list(fast.parameters())
    assert _plain_module(fast)
    _fill(fast, weights)
    slow.load_state_dict(weights)
    assert list(fast.parameters()) == params  # in place: the optimizer's tensors still
    for k, v in slow.state_dict().items():
        assert torch.equal(fast.state_dict()[k], v), k
        assert fast.state_dict()[k].data_ptr() != weights[k].data_ptr()  # a copy, not a view


def test_fill_refuses_weights_that_do_not_fit() -> None:
    weights = dict(_model(1).state_dict())
    with pytest.raises(RingStateError, match="does not fit"):
        _fill(_model(2), {k: v for k, v in weights.items() if k != "0.bias"})
    wrong = dict(weights, **{"0.weight": torch.zeros(4, 7)})
    with pytest.raises(RingStateError, match="does not fit"):
        _fill(_model(2), wrong)
    with pytest.raises(RingStateError, match="does not fit"):
        _fill(_model(2), dict(weights, extra=torch.zeros(1)))


def test_a_model_with_its_own_loading_goes_through_load_state_dict() -> None:
    calls: list[str] = []
    model = _model(2)
    model.register_load_state_dict_post_hook(lambda module, keys: calls.append("post"))
    assert not _plain_module(model)
    _fill(model, _model(1).state_dict())
    assert calls == ["post"]
    assert torch.equal(model.state_dict()["0.weight"], _model(1).state_dict()["0.weight"])

    class Rescaled(nn.Linear):
        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"] * 2
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    custom = nn.Sequential(Rescaled(3, 2))
    source = nn.Sequential(nn.Linear(3, 2)).state_dict()
    assert not _plain_module(custom)
    _fill(custom, source)
    assert torch.equal(custom[0].weight, source["0.weight"] * 2)


def test_adam_state_read_in_place_is_what_state_dict_gives() -> None:
    model = _model(3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _trained(model, optimizer, 0)
    assert _plain_adam(optimizer)
    got = dict(optimizer_tensors(model, optimizer))
    want = _generic_tensors(model, optimizer)
    assert list(got) == list(want)
    for k, v in want.items():
        assert torch.equal(got[k], v) and got[k].data_ptr() != v.data_ptr(), k


def test_adam_state_loaded_in_place_trains_as_load_state_dict_does() -> None:
    source = _model(3)
    trained = torch.optim.Adam(source.parameters(), lr=1e-2)
    _trained(source, trained, 0)
    state = dict(optimizer_tensors(source, trained))
    snapshot = {k: v.clone() for k, v in state.items()}

    fast_model, slow_model = _model(4), _model(4)
    fast = torch.optim.Adam(fast_model.parameters(), lr=1e-2)
    slow = torch.optim.Adam(slow_model.parameters(), lr=1e-2)
    load_optimizer(fast_model, fast, {k[6:]: v for k, v in state.items()})
    by_index = {}
    names = [n for n, _ in slow_model.named_parameters()]
    for k, v in state.items():
        pname, _, skey = k[6:].rpartition(".")
        by_index.setdefault(names.index(pname), {})[skey] = v.clone()
    slow.load_state_dict({"state": by_index, "param_groups": slow.state_dict()["param_groups"]})
    _trained(fast_model, fast, 1)
    _trained(slow_model, slow, 1)
    slow_weights = slow_model.state_dict()
    for k, v in fast_model.state_dict().items():
        assert torch.equal(v, slow_weights[k]), k
    assert _generic_tensors(fast_model, fast).keys() == _generic_tensors(slow_model, slow).keys()
    for k, v in _generic_tensors(slow_model, slow).items():
        assert torch.equal(_generic_tensors(fast_model, fast)[k], v), k
    assert all(torch.equal(state[k], snapshot[k]) for k in state)  # the source is not trained


def test_other_optimizers_keep_torch_s_own_paths() -> None:
    model = _model(5)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hooked = torch.optim.Adam(model.parameters())
    hooked.register_state_dict_post_hook(lambda opt, sd: sd)
    assert not _plain_adam(sgd) and not _plain_adam(hooked)
    _trained(model, sgd, 2)
    state = dict(optimizer_tensors(model, sgd))
    assert state.keys() == _generic_tensors(model, sgd).keys()
    other = _model(5)
    again = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    load_optimizer(other, again, {k[6:]: v for k, v in state.items()})
    for k, v in dict(optimizer_tensors(other, again)).items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(RingStateError, match="unknown parameter"):
        load_optimizer(other, again, {"9.weight.momentum_buffer": torch.zeros(1)})
