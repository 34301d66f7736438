"""A peer's life as a state table: every row reachable, every other step refused, recorded."""

from __future__ import annotations

from collections import deque

import pytest

from fedup.errors import LocalProtocolError
from fedup.protocol.lifecycle import LIFE, Life, Lifecycle

ROWS = [(state, step, nxt) for state, steps in LIFE.items() for step, nxt in steps.items()]
STEPS = sorted({step for _, step, _ in ROWS} | {"crashed", ""})


def path_to(target: Life) -> list[str]:
    """The shortest list of steps from STARTING to ``target`` (breadth first)."""
    paths: dict[Life, list[str]] = {Life.STARTING: []}
    queue = deque([Life.STARTING])
    while queue:
        state = queue.popleft()
        for step, nxt in LIFE[state].items():
            if nxt not in paths:
                paths[nxt] = [*paths[state], step]
                queue.append(nxt)
    return paths[target]


def at(state: Life) -> Lifecycle:
    life = Lifecycle()
    for i, step in enumerate(path_to(state)):
        life.step(step, float(i))
    assert life.state is state
    return life


def test_the_table_documented_in_the_module() -> None:
    assert set(LIFE) == set(Life)
    assert LIFE[Life.STARTING] == {"listening": Life.FORMING, "failed": Life.FAILED}
    assert LIFE[Life.FORMING] == {"joined": Life.TRAINING, "failed": Life.FAILED}
    assert LIFE[Life.TRAINING] == {
        "finishing": Life.FINISHING,
        "excluded": Life.EXCLUDED,
        "failed": Life.FAILED,
    }
    assert LIFE[Life.EXCLUDED] == {"finishing": Life.FINISHING, "failed": Life.FAILED}
    assert LIFE[Life.FINISHING] == {"done": Life.DONE, "failed": Life.FAILED}
    assert LIFE[Life.DONE] == {} and LIFE[Life.FAILED] == {}


def test_a_new_peer_is_starting_with_no_history() -> None:
    life = Lifecycle()
    assert life.state is Life.STARTING and life.history == []
    assert Lifecycle().history is not life.history  # not shared between peers


@pytest.mark.parametrize(
    ("state", "step", "nxt"), ROWS, ids=[f"{s.value}-{step}" for s, step, _ in ROWS]
)
def test_every_row_is_reachable_by_step(state: Life, step: str, nxt: Life) -> None:
    life = at(state)
    before = list(life.history)
    assert life.can(step)
    assert life.step(step, 100.5) is nxt
    assert life.state is nxt
    assert life.history == [*before, (100.5, nxt)]


@pytest.mark.parametrize("state", list(Life), ids=[s.value for s in Life])
def test_every_other_step_is_refused_and_changes_nothing(state: Life) -> None:
    life = at(state)
    before = list(life.history)
    refused = [s for s in STEPS if s not in LIFE[state]]
    assert refused, "every state refuses something"
    for step in refused:
        assert not life.can(step)
        with pytest.raises(LocalProtocolError) as info:
            life.step(step, 999.0)
        message = str(info.value)
        assert state.value in message and repr(step) in message
        assert message == f"a peer that is {state.value} cannot take step {step!r}"
        assert life.state is state and life.history == before


@pytest.mark.parametrize("end", [Life.DONE, Life.FAILED])
def test_the_ends_take_no_step(end: Life) -> None:
    life = at(end)
    for step in STEPS:
        assert not life.can(step)
        with pytest.raises(LocalProtocolError, match=end.value):
            life.step(step, 1.0)


def test_history_records_each_state_entered_with_its_time() -> None:
    life = Lifecycle()
    assert life.step("listening", 0.25) is Life.FORMING
    assert life.step("joined", 3.0) is Life.TRAINING
    assert life.step("excluded", 7.5) is Life.EXCLUDED
    assert life.step("finishing", 9.0) is Life.FINISHING
    assert life.step("done", 12.0) is Life.DONE
    assert life.history == [
        (0.25, Life.FORMING),
        (3.0, Life.TRAINING),
        (7.5, Life.EXCLUDED),
        (9.0, Life.FINISHING),
        (12.0, Life.DONE),
    ]


def test_a_refused_step_after_progress_keeps_the_history() -> None:
    life = Lifecycle()
    life.step("listening", 1.0)
    with pytest.raises(LocalProtocolError, match="forming cannot take step 'done'"):
        life.step("done", 2.0)
    assert life.history == [(1.0, Life.FORMING)]
    assert life.step("failed", 3.0) is Life.FAILED
    assert life.history == [(1.0, Life.FORMING), (3.0, Life.FAILED)]


def test_every_state_can_fail_until_the_end() -> None:
    for state in Life:
        assert at(state).can("failed") == (state not in (Life.DONE, Life.FAILED))
