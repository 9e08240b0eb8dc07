import itertools
import random

import pytest

from edgeguard.engines.debounce import Debouncer, first_trigger
from edgeguard.verdict import StreamState

S, U, C = "Safe", "Unsafe", "Controversial"


def run(labels, categories=None):
    categories = categories or [f"cat{i}" for i in range(len(labels))]
    debouncer = Debouncer()
    states = [debouncer.push(label, category) for label, category in zip(labels, categories)]
    return debouncer, states


@pytest.mark.parametrize(
    "labels, expected",
    [
        ([], None),
        ([S, S, S], None),
        ([U], None),
        ([S, U, S, U, S], None),  # single Unsafe tokens never trigger
        ([U, C, U, C, U, C], None),  # mixed pairs never trigger
        ([C, U, C, U], None),
        ([S, U, U, S], (2, U)),
        ([U, U, U, U], (1, U)),
        ([S, C, C, S], (2, C)),
        ([C, C, S, U, U], (4, U)),  # an Unsafe pair wins over an earlier Controversial pair
        ([S, C, C, C, C, U, C, U, U], (8, U)),
        ([C, C, U, C, C], (1, C)),  # the first Controversial pair, not a later one
        ([U, S, U, C, C], (4, C)),
    ],
)
def test_first_trigger(labels, expected):
    assert first_trigger(labels) == expected
    debouncer, _ = run(labels)
    state = debouncer.state
    if expected is None:
        assert state == StreamState(False, S, None, None)
    else:
        index, label = expected
        assert state == StreamState(True, label, f"cat{index}", index)


def test_category_is_the_triggering_tokens():
    labels = [U, U, U]
    debouncer, _ = run(labels, ["Violent", "PII", "Jailbreak"])
    assert debouncer.state.category == "PII"
    assert debouncer.state.flagged_at == 1


def test_streaming_states_escalate_and_upgrade():
    labels = [S, C, C, S, U, S, U, U, C, C]
    cats = ["x", "a", "b", "x", "c", "x", "d", "e", "f", "g"]
    _, states = run(labels, cats)
    assert [s.label for s in states] == [S, S, C, C, C, C, C, U, U, U]
    assert states[2] == StreamState(True, C, "b", 2)
    assert states[7] == StreamState(True, U, "e", 7)
    assert states[-1] == states[7]


def test_unsafe_is_reported_as_soon_as_the_pair_appears():
    _, states = run([S, U, U])
    assert states[1].label == S
    assert states[2] == StreamState(True, U, "cat2", 2)


def test_final_state_matches_offline_rule_exhaustively():
    for n in range(7):
        for labels in itertools.product((S, U, C), repeat=n):
            debouncer, _ = run(list(labels))
            expected = first_trigger(labels)
            state = debouncer.state
            assert (state.flagged_at, state.label) == (
                expected if expected else (None, S)
            ), labels


def test_rollback_equals_fresh():
    rng = random.Random(0)
    for _ in range(300):
        labels = [rng.choice((S, U, C)) for _ in range(rng.randrange(0, 12))]
        cats = [f"c{rng.randrange(8)}" for _ in labels]
        n = rng.randrange(0, len(labels) + 1)
        debouncer, _ = run(labels, cats)
        rolled = debouncer.rollback(n)
        fresh, _ = run(labels[: len(labels) - n], cats[: len(labels) - n])
        assert rolled == fresh.state == debouncer.state
        assert len(debouncer) == len(labels) - n
        # pushing after a rollback continues as if the dropped tokens never came
        extra = [rng.choice((S, U, C)) for _ in range(4)]
        for label in extra:
            debouncer.push(label, "z")
            fresh.push(label, "z")
        assert debouncer.state == fresh.state


def test_rollback_undoes_an_upgrade():
    debouncer, _ = run([C, C, U, U])
    assert debouncer.state.label == U
    assert debouncer.rollback(1) == StreamState(True, C, "cat1", 1)
    assert debouncer.rollback(3) == StreamState(False, S, None, None)


def test_rollback_and_labels_are_checked():
    debouncer, _ = run([S, U])
    with pytest.raises(ValueError):
        debouncer.rollback(3)
    with pytest.raises(ValueError):
        debouncer.rollback(-1)
    with pytest.raises(ValueError):
        debouncer.push("unsafe", None)
    with pytest.raises(ValueError):
        first_trigger(["Safe", "maybe"])
    debouncer.reset()
    assert len(debouncer) == 0 and not debouncer.state.flagged


def test_stream_state_is_consistent_and_serializes():
    state = StreamState(True, U, "Violent", 3)
    assert state.to_dict() == {"label": U, "category": "Violent", "flagged_at": 3}
    with pytest.raises(ValueError):
        StreamState(True, S, None, None)
    with pytest.raises(ValueError):
        StreamState(False, S, None, 2)
    with pytest.raises(Exception):
        state.label = S
