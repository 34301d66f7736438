"""Merging peers' column summaries: exact pooling, digests, refusals, untrusted dicts."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import attrs
import numpy as np
import pytest

from fedup.learn.schema import (
    CATEGORICAL,
    NUMERIC,
    ColumnSummary,
    DataSummary,
    SchemaMismatchError,
    SummaryError,
    SummaryLimits,
    admit,
    fits,
    label_key,
    merge_summaries,
    schema_from_dict,
    unused_columns,
)
from fedup.protocol import cbor


def numeric(name: str, x: np.ndarray, n_missing: int = 0) -> ColumnSummary:
    mean = float(x.mean()) if len(x) else 0.0
    return ColumnSummary(name, NUMERIC, len(x), n_missing, mean=mean,
                         m2=float(((x - mean) ** 2).sum()))  # fmt: skip


def categorical(
    name: str, counts: dict[str, int], other: int = 0, n_missing: int = 0
) -> ColumnSummary:
    cats = tuple(sorted(counts.items(), key=lambda vc: (-vc[1], vc[0])))
    return ColumnSummary(name, CATEGORICAL, sum(counts.values()) + other, n_missing,
                         categories=cats, other_count=other)  # fmt: skip


def summary(
    n_rows: int, *columns: ColumnSummary, n_positive: int = 0, target: str = "y"
) -> DataSummary:
    return DataSummary(target, n_rows, n_positive, columns)


@pytest.fixture
def peers() -> list[tuple[DataSummary, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for n, loc, scale in [(17, 3.0, 1.0), (1000, -250.0, 40.0), (3, 1e6, 1e-3), (250, 0.1, 7.0)]:
        x = rng.normal(loc, scale, n)
        s = summary(n, numeric("x", x), categorical("c", {"a": n // 2, "b": n - n // 2}),
                    n_positive=n // 3)  # fmt: skip
        out.append((s, x))
    return out


def test_pooled_statistics_equal_numpy_on_concatenated_data(
    peers: list[tuple[DataSummary, np.ndarray]],
) -> None:
    schema = merge_summaries([s for s, _ in peers], "y")
    pooled = np.concatenate([x for _, x in peers])
    col = schema.column("x")
    assert col is not None
    assert math.isclose(col.mean, float(pooled.mean()), rel_tol=1e-12)
    assert math.isclose(col.std, float(pooled.std()), rel_tol=1e-9)
    assert schema.n_rows == len(pooled)
    assert schema.n_positive == sum(s.n_positive for s, _ in peers)
    cats = schema.column("c")
    assert cats is not None and cats.categories == ("b", "a")  # 636 b, 634 a


def test_digest_is_deterministic_and_order_independent(
    peers: list[tuple[DataSummary, np.ndarray]],
) -> None:
    summaries = [s for s, _ in peers]
    digests = {
        merge_summaries(list(order), "y").digest() for order in itertools.permutations(summaries)
    }
    assert len(digests) == 1
    assert merge_summaries(summaries, "y") == merge_summaries(list(reversed(summaries)), "y")
    changed = [*summaries[:3], summary(251, *summaries[3].columns[:1], summaries[3].columns[1])]
    assert merge_summaries(changed, "y").digest() not in digests
    schema = merge_summaries(summaries, "y")
    assert schema.digest() in digests  # asked once: made and kept
    assert attrs.evolve(schema, n_rows=schema.n_rows + 1).digest() not in digests  # a new schema


def test_vocabulary_union_is_capped_deterministically() -> None:
    a = summary(10, categorical("c", {"x": 4, "y": 3, "z": 3}))
    b = summary(10, categorical("c", {"w": 5, "z": 2, "v": 3}))
    schema = merge_summaries([a, b], "y", max_categories=3)
    col = schema.column("c")
    assert col is not None
    assert col.categories == ("w", "z", "x")  # w=5, z=5 (tie: by value), x=4; v and y dropped
    assert col.width == 4  # three values and "other"
    assert merge_summaries([b, a], "y", max_categories=3) == schema


def test_missing_indicator_and_empty_columns() -> None:
    a = summary(5, numeric("x", np.arange(5.0)))
    b = summary(5, numeric("x", np.arange(3.0), n_missing=2))
    schema = merge_summaries([a, b], "y")
    col = schema.column("x")
    assert col is not None and col.missing and col.width == 2
    # A column with no values at all fits either kind and does not vote.
    empty = summary(4, ColumnSummary("x", CATEGORICAL, 0, 4))
    merged = merge_summaries([a, empty, b], "y")
    assert merged.column("x") is not None
    fits(empty, merged)


def test_common_columns_make_the_schema_and_the_majority_decides_kinds() -> None:
    good = summary(3, numeric("age", np.ones(3)), categorical("region", {"n": 3}))
    extra = summary(3, numeric("age", np.ones(3)), categorical("region", {"n": 3}),
                    numeric("secret", np.ones(3)))  # fmt: skip
    missing = summary(3, numeric("age", np.ones(3)))
    words = summary(3, categorical("age", {"old": 3}), categorical("region", {"s": 3}))
    schema = merge_summaries([good, good, extra, words], "y")
    assert [c.name for c in schema.columns] == ["age", "region"]  # 'secret': one has it
    assert [c.kind for c in schema.columns] == [NUMERIC, CATEGORICAL]
    fits(good, schema)
    fits(extra, schema)  # a column the federation does not use is no reason to refuse
    assert unused_columns(extra, schema) == ["secret"]
    assert unused_columns(good, schema) == []
    with pytest.raises(SchemaMismatchError, match="missing columns 'region'") as e2:
        fits(missing, schema)
    assert e2.value.missing == ("region",)
    assert [c.name for c in merge_summaries([good, extra, missing], "y").columns] == ["age"]
    with pytest.raises(
        SchemaMismatchError, match=r"type conflicts 'age' \(categorical here, numeric in the"
    ) as e3:
        fits(words, schema)
    assert e3.value.conflicts == ("age",)
    other_target = summary(3, numeric("age", np.ones(3)), categorical("region", {"n": 3}),
                           target="label")  # fmt: skip
    with pytest.raises(SchemaMismatchError, match="target is 'label'") as e4:
        fits(other_target, schema)
    assert e4.value.target
    named = e3.value.with_peer("12D3KooWpeer")
    assert named.peer == "12D3KooWpeer" and named.conflicts == ("age",)
    assert str(named).startswith("12D3KooWpeer: ")


def test_admit_refuses_and_merges_without_the_refused() -> None:
    a = summary(4, numeric("x", np.array([0.0, 1.0, 2.0, 3.0])), numeric("z", np.ones(4)))
    b = summary(2, numeric("x", np.array([4.0, 5.0])), numeric("z", np.ones(2)))
    odd = summary(2, numeric("x", np.array([1e9, 1e9])), categorical("z", {"words": 2}),
                  numeric("leak", np.ones(2)))  # fmt: skip
    result = admit([a, odd, b], "y")
    assert result.admitted == (0, 2)
    assert list(result.refused) == [1]
    assert result.refused[1].conflicts == ("z",)
    col = result.schema.column("x")
    assert col is not None and col.mean == 2.5  # the refused peer's numbers are not pooled
    assert result.schema == merge_summaries([a, b], "y")
    with pytest.raises(SchemaMismatchError, match="no peer"):
        admit([summary(1, numeric("x", np.ones(1)), target="other")], "y")


def test_round_trip_through_cbor(peers: list[tuple[DataSummary, np.ndarray]]) -> None:
    for s, _ in peers:
        wire = cbor.encode(s.to_dict())
        back = DataSummary.from_dict(cbor.decode(wire, max_size=1 << 20, max_depth=8))
        assert back == s


def good_dict() -> dict[str, Any]:
    return summary(
        4, numeric("x", np.array([1.0, 2.0, 3.0])  , n_missing=1),
        categorical("c", {"a": 3}, other=1), n_positive=1,
    ).to_dict()  # fmt: skip


def mutate(path: list[Any], value: Any) -> dict[str, Any]:
    d = good_dict()
    node: Any = d
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["v"], 2, "'v' must be 1"),
        (["surprise"], 1, "unknown field"),
        (["n_rows"], -1, "unsigned"),
        (["n_rows"], True, "unsigned"),
        (["n_positive"], 9, "between"),
        (["target"], "", "must not be empty"),
        (["target"], "t" * 200, "at most 128 bytes"),
        (["columns"], "x", "must be an array"),
        (["columns", 0, "kind"], "text", "must be one of"),
        (["columns", 0, "mean"], math.nan, "finite"),
        (["columns", 0, "m2"], -1.0, "negative"),
        (["columns", 0, "mean"], 1.7e308, r"columns\[0\]: field 'mean' must be at most 1e\+100"),
        (["columns", 0, "m2"], 1e201, r"columns\[0\]: field 'm2' must be at most 1e\+200"),
        (["columns", 0, "count"], 2, "does not have n_rows values"),
        (["columns", 0, "name"], "c", "repeated column"),
        (["columns", 0, "name"], "y", "also a feature"),
        (["columns", 0, "mean"], DELETE, "missing field 'mean'"),
        (["columns", 1, "categories"], [["a", 3], ["a", 0]], "count must be positive"),
        (["columns", 1, "categories"], [["a", 2], ["a", 1]], "repeated category"),
        (["columns", 1, "categories"], [["a", 2]], "do not add up"),
        (["columns", 1, "categories"], [["", 3]], "value must be"),
        (["columns", 1, "categories"], [[3, "a"]], "pair"),
        (["columns", 1, "categories"], [[f"v{i}", 1] for i in range(65)], "0 to 64 items"),
        (["positive_label"], 1, "'positive_label' must be a text string"),
        (["negative_label"], "n" * 129, "'negative_label' must be at most 128 bytes"),
        (["negative_label"], "", "'negative_label' must not be empty"),
    ],
)
def test_untrusted_dicts_are_checked(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(SummaryError, match=message):
        DataSummary.from_dict(mutate(path, value))


def test_limits_bound_sizes() -> None:
    d = good_dict()
    with pytest.raises(SummaryError, match="0 to 1 items"):
        DataSummary.from_dict(d, limits=SummaryLimits(max_columns=1))
    assert DataSummary.from_dict(d) == DataSummary.from_dict(good_dict())
    with pytest.raises(SummaryError, match="expected a map"):
        DataSummary.from_dict([1, 2])


def test_a_column_only_some_members_have_is_left_out_not_refused() -> None:
    a = summary(4, numeric("x", np.arange(4.0)), numeric("id", np.arange(4.0)))
    b = summary(3, numeric("x", np.arange(3.0)))
    c = summary(5, numeric("x", np.arange(5.0)), categorical("note", {"k": 5}))
    result = admit([a, b, c], "y")
    assert result.admitted == (0, 1, 2) and result.refused == {}
    assert [col.name for col in result.schema.columns] == ["x"]
    assert result.schema.n_rows == 12  # every member's rows count
    assert unused_columns(a, result.schema) == ["id"]
    assert unused_columns(c, result.schema) == ["note"]


def test_a_member_with_no_column_in_common_is_refused_not_the_schema_emptied() -> None:
    a = summary(4, numeric("x", np.arange(4.0)), numeric("z", np.arange(4.0)))
    b = summary(3, numeric("x", np.arange(3.0)))
    c = summary(3, numeric("z", np.arange(3.0)))  # nothing in common with a and b together
    stranger = summary(3, numeric("other", np.arange(3.0)))
    result = admit([a, b, c, stranger], "y")
    assert result.admitted == (0, 1)
    assert "no column in common with the federation's ('x')" in result.refused[2].reason
    assert "no column in common" in result.refused[3].reason
    assert [col.name for col in result.schema.columns] == ["x"]


def labelled(positive: str | None, negative: str | None, n: int = 4) -> DataSummary:
    return DataSummary("y", n, 1, (numeric("x", np.arange(float(n))),), negative, positive)


def test_members_who_read_a_label_as_opposite_classes_do_not_train_together() -> None:
    leader = labelled("bad", "good")
    same = labelled("bad", "good")
    other_spelling = labelled("1", "0")  # spelled differently: nothing to contradict
    inverted = labelled("good", "bad")  # --positive-label good: the opposite target
    half = labelled("good", None)  # no negatives here, but 'good' is 1 to it
    result = admit([leader, same, other_spelling, inverted, half], "y")
    assert result.admitted == (0, 1, 2)
    assert "positive label here is 'good', which is the negative label" in (
        result.refused[3].reason
    )
    assert result.refused[3].target and result.refused[4].target
    assert result.schema.positive_labels == ("1", "bad")
    assert result.schema.negative_labels == ("0", "good")
    with pytest.raises(SchemaMismatchError, match="positive label here is 'good'"):
        fits(inverted, result.schema)
    with pytest.raises(SchemaMismatchError, match="negative label here is 'bad'"):
        fits(labelled(None, "bad"), result.schema)
    fits(same, result.schema)
    # Merged anyway (admit refuses whoever contradicts the leader), a spelling read both
    # ways is in neither list: it checks nothing any more.
    both_ways = merge_summaries([leader, inverted], "y")
    assert both_ways.positive_labels == both_ways.negative_labels == ()
    # The labels travel in the summary and the schema, and the schema's digest covers them.
    wire = cbor.decode(cbor.encode(inverted.to_dict()), max_size=1 << 20, max_depth=8)
    assert DataSummary.from_dict(wire) == inverted
    back = schema_from_dict(cbor.decode(cbor.encode(result.schema.to_dict()), max_size=1 << 20,
                                        max_depth=8))  # fmt: skip
    assert back == result.schema
    unlabelled = merge_summaries([labelled(None, None)], "y")
    assert unlabelled.digest() != merge_summaries([labelled("1", "0")], "y").digest()
    assert "negative_labels" not in unlabelled.to_dict()  # as before labels were shared


def test_many_spellings_of_a_class_refuse_nobody_and_the_schema_keeps_the_leaders() -> None:
    many = [labelled(f"yes{i:02}", f"no{i:02}") for i in reversed(range(20))]
    result = admit(many, "y")
    assert result.admitted == tuple(range(20)) and result.refused == {}
    positive = result.schema.positive_labels
    assert len(positive) == 16 and "yes19" in positive  # the leader's spelling stays
    assert positive == tuple(sorted(positive))


# --- what a member's lies about its own data can and cannot do --------------------------


def test_a_member_cannot_get_another_refused_by_a_lie_about_its_labels() -> None:
    leader = labelled("1", "0")
    liar = labelled("1", "yes")  # says 'yes' means 0 here: the honest member reads it as 1
    honest = labelled("yes", "no")
    result = admit([leader, liar, honest], "y")
    assert result.admitted == (0, 1, 2) and result.refused == {}
    assert "yes" not in result.schema.negative_labels + result.schema.positive_labels
    fits(honest, result.schema)  # and the honest member takes the view the leader sends


def test_a_member_cannot_get_others_refused_by_sharing_one_column_with_the_leader() -> None:
    names = ["a", "b", "c", "d"]
    leader = summary(4, *(numeric(n, np.arange(4.0)) for n in [*names, "x"]))
    liar = summary(4, numeric("x", np.arange(4.0)))  # only the leader's 'x'
    honest = [summary(4, *(numeric(n, np.arange(4.0)) for n in names)) for _ in range(2)]
    result = admit([leader, liar, *honest], "y")
    assert result.admitted == (0, 2, 3)
    assert "no column in common" in result.refused[1].reason
    assert [c.name for c in result.schema.columns] == names


def test_a_member_that_lacks_columns_narrows_the_schema_and_the_leader_can_tell() -> None:
    """Documented in docs/federation.md (what a member can still do): a member that
    withholds columns is admitted, and the schema keeps only what every member has."""
    leader = summary(4, numeric("a", np.arange(4.0)), numeric("b", np.arange(4.0)))
    narrow = summary(4, numeric("a", np.arange(4.0)))
    result = admit([leader, narrow], "y")
    assert result.admitted == (0, 1)
    assert [c.name for c in result.schema.columns] == ["a"]
    assert result.left_out == {"b": (1,)}


@pytest.mark.parametrize(
    ("ours", "theirs", "problem"),
    [
        (("yes", "no"), ("No", "Yes"), "positive label here is 'No'"),  # case aside
        (("1", "0"), ("0.0", "1.0"), "positive label here is '0.0'"),  # a number by value
        (("yes", "no"), (" no ", None), "positive label here is ' no '"),
    ],
)
def test_labels_are_compared_as_the_reader_reads_them(
    ours: tuple[str, str], theirs: tuple[str, str | None], problem: str
) -> None:
    result = admit([labelled(*ours), labelled(*theirs)], "y")
    assert result.admitted == (0,) and problem in result.refused[1].reason
    with pytest.raises(SchemaMismatchError, match=re.escape(problem)):
        fits(labelled(*theirs), merge_summaries([labelled(*ours)], "y"))
    assert label_key("1") == label_key("1.0") == label_key(" 01 ") != label_key("10")


def test_a_tie_of_kinds_goes_to_the_leader_not_against_it() -> None:
    leader = summary(4, numeric("age", np.arange(4.0)))
    liar = summary(4, categorical("age", {"old": 2, "young": 2}))
    result = admit([leader, liar], "y")
    assert result.admitted == (0,)
    assert "'age' (categorical here, numeric in the federation)" in result.refused[1].reason
    assert admit([liar, leader], "y").admitted == (0,)  # led by the other: its kind


def test_untrusted_labels_are_checked() -> None:
    both = {**good_dict(), "negative_label": "x", "positive_label": "x"}
    with pytest.raises(SummaryError, match="'x' is both the negative and positive label"):
        DataSummary.from_dict(both)
    schema = merge_summaries([labelled("1", "0")], "y").to_dict()
    for change, message in [
        ({"positive_labels": ["0"]}, "both negative and positive"),
        ({"positive_labels": ["b", "a"]}, "unique and sorted"),
        ({"positive_labels": [f"v{i:02}" for i in range(17)]}, "0 to 16 items"),
        ({"positive_labels": [3]}, "must be text"),
    ]:
        with pytest.raises(SummaryError, match=message):
            schema_from_dict({**schema, **change})
    lone = dict(schema)
    del lone["positive_labels"]
    with pytest.raises(SummaryError, match="missing field 'positive_labels'"):
        schema_from_dict(lone)
