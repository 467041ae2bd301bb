"""Unlearning requests: construction, strict parsing, fuzzing, and validation that lists every problem."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fl_unlearn.requests as requests_mod
from fl_unlearn.errors import RequestError
from fl_unlearn.lineage import LineageGraph, TrainingData
from fl_unlearn.requests import (
    FrozenMap,
    UnlearningRequest,
    parse_request,
    parse_samples_file,
    validate_request,
)

# --------------------------------------------------------------------------------------------------
# construction and round trips
# --------------------------------------------------------------------------------------------------


def test_constructors_dedupe_and_sort_ids():
    assert UnlearningRequest.for_classes([7, 3, 7]).classes == (3, 7)
    assert UnlearningRequest.for_clients(iter([2, 1])).clients == (1, 2)
    r = UnlearningRequest.for_samples({5: [11, 10, 11], 2: [1]})
    assert list(r.samples) == [2, 5] and r.samples[5] == (10, 11)


def test_request_is_frozen_and_hashable():
    r = UnlearningRequest.for_samples({5: [1, 2]}, id="r1", created=1.0)
    assert hash(r) == hash(UnlearningRequest.for_samples({5: (2, 1)}, id="r1", created=1.0))
    with pytest.raises(AttributeError):
        r.kind = "classes"  # type: ignore[misc]


def test_default_id_is_uuid4_hex_and_unique():
    a, b = UnlearningRequest.for_classes([1]), UnlearningRequest.for_classes([1])
    assert len(a.id) == 32 and int(a.id, 16) >= 0 and a.id != b.id


@pytest.mark.parametrize(
    "request_",
    [
        UnlearningRequest.for_classes([0, 9]),
        UnlearningRequest.for_clients([3]),
        UnlearningRequest.for_samples({5: [10, 11], 0: [2**62]}),
    ],
)
def test_json_round_trip(request_):
    assert UnlearningRequest.from_json(request_.to_json()) == request_
    assert parse_request(request_.to_json()) == request_
    assert parse_request(json.loads(request_.to_json())) == request_


def test_parse_request_from_path_and_str_path(tmp_path):
    f = tmp_path / "req.json"
    f.write_text('{"kind": "client", "clients": [4, 4, 1], "id": "abc", "created": 5}')
    assert parse_request(f) == parse_request(str(f))
    assert parse_request(f).clients == (1, 4) and parse_request(f).id == "abc"


def test_samples_json_keys_are_strings():
    r = parse_request({"kind": "samples", "samples": {"5": [3], "12": [1, 2]}})
    assert dict(r.samples) == {5: (3,), 12: (1, 2)}
    assert json.loads(r.to_json())["samples"] == {"5": [3], "12": [1, 2]}


def test_numpy_integers_are_ids():
    np = pytest.importorskip("numpy")
    assert UnlearningRequest.for_classes(np.array([3, 1])).classes == (1, 3)


def test_describe():
    assert UnlearningRequest.for_classes([7]).describe() == "forget class [7]"
    assert UnlearningRequest.for_samples({1: [1, 2]}).describe() == "forget 2 samples (client 1: 2)"


def test_parse_samples_file(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('{"3": [5, 4, 4], "0": [1]}')
    assert parse_samples_file(f) == {0: (1,), 3: (4, 5)}
    f.write_text("{}")
    with pytest.raises(RequestError, match="empty forget set"):
        parse_samples_file(f)


# --------------------------------------------------------------------------------------------------
# malformed input: always RequestError, naming the value
# --------------------------------------------------------------------------------------------------

MALFORMED = [
    ('{"kind": "classes"', "malformed"),
    ("[1, 2]", "JSON object"),
    ({"classes": [1]}, "no 'kind'"),
    ({"kind": "cats", "classes": [1]}, "'cats'"),
    ({"kind": 3, "classes": [1]}, "kind 3"),
    ({"kind": "classes"}, "needs the key 'classes'"),
    ({"kind": "classes", "classes": [1], "clients": []}, r"unexpected keys \['clients'\]"),
    ({"kind": "classes", "classes": [1], "foo": 1}, "foo"),
    ({"kind": "classes", "classes": []}, "empty forget set"),
    ({"kind": "classes", "classes": [-1]}, r"\[-1\]"),
    ({"kind": "classes", "classes": [1.0]}, r"\[1.0\]"),
    ({"kind": "classes", "classes": [True]}, r"\[True\]"),
    ({"kind": "classes", "classes": ["1"]}, r"\['1'\]"),
    ({"kind": "classes", "classes": [None]}, "None"),
    ({"kind": "classes", "classes": [2**63]}, str(2**63)),
    ({"kind": "classes", "classes": "1"}, "list of integer ids"),
    ({"kind": "classes", "classes": 7}, "list of integer ids"),
    ({"kind": "classes", "classes": {"a": 1}}, "list of integer ids"),
    ({"kind": "client", "clients": [[1]]}, r"\[\[1\]\]"),
    ({"kind": "samples", "samples": [1]}, "must map partition ids"),
    ({"kind": "samples", "samples": {}}, "empty forget set"),
    ({"kind": "samples", "samples": {"5": []}}, "client 5 is empty"),
    ({"kind": "samples", "samples": {"x": [1]}}, "'x'"),
    ({"kind": "samples", "samples": {"05": [1]}}, "'05'"),
    ({"kind": "samples", "samples": {"-1": [1]}}, "'-1'"),
    ({"kind": "samples", "samples": {"5": [1, -2]}}, r"\[-2\]"),
    ({"kind": "samples", "samples": {"5": "12"}}, "list of integer ids"),
    ({"kind": "samples", "samples": {5: [1], "5": [2]}}, "partition 5 twice"),
    ({"kind": "classes", "classes": [1], "id": 5}, "request id"),
    ({"kind": "classes", "classes": [1], "id": ""}, "request id"),
    ({"kind": "classes", "classes": [1], "id": "../x"}, "request id"),
    ({"kind": "classes", "classes": [1], "id": ".hidden"}, "request id"),
    ({"kind": "classes", "classes": [1], "created": "now"}, "created"),
    ({"kind": "classes", "classes": [1], "created": math.nan}, "created"),
    ({"kind": "classes", "classes": [1], "created": -1}, "created"),
    ({"kind": "classes", "classes": [1], "created": True}, "created"),
    ({1: "classes"}, "keys must be strings"),
    ('{"kind": "classes", "kind": "client", "classes": [1]}', "duplicate key 'kind'"),
    ('{"kind": "classes", "classes": [NaN]}', r"\[nan\]"),
    ("[" * 100_000, "malformed"),
    (5, "got int"),
    (None, "got NoneType"),
    (b'{"kind": "classes"}', "got bytes"),
]


@pytest.mark.parametrize(("obj", "match"), MALFORMED)
def test_malformed_requests_raise_request_error(obj, match):
    with pytest.raises(RequestError, match=match):
        parse_request(obj)


def test_missing_file_and_directory_raise_request_error(tmp_path):
    with pytest.raises(RequestError, match="not found"):
        parse_request(tmp_path / "nope.json")
    with pytest.raises(RequestError, match="cannot read"):
        parse_request(tmp_path)


def test_file_with_bad_json_names_the_file(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(RequestError, match="bad.json"):
        parse_request(f)


def test_too_many_ids(monkeypatch):
    monkeypatch.setattr(requests_mod, "MAX_IDS", 5)
    with pytest.raises(RequestError, match="MAX_IDS=5"):
        UnlearningRequest.for_classes(range(6))
    with pytest.raises(RequestError, match="MAX_IDS=5"):
        parse_request({"kind": "samples", "samples": {"1": [1, 2, 3], "2": [4, 5, 6]}})


def test_fields_must_match_kind():
    with pytest.raises(RequestError, match="must not set 'clients'"):
        UnlearningRequest("classes", classes=(1,), clients=(2,))


# --------------------------------------------------------------------------------------------------
# fuzzing: only success or RequestError
# --------------------------------------------------------------------------------------------------

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**64) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)
near_valid = st.fixed_dictionaries(
    {"kind": st.sampled_from(["classes", "client", "samples", "x"]) | json_like},
    optional={
        "classes": json_like | st.lists(st.integers(-2, 20), max_size=5),
        "clients": json_like | st.lists(st.integers(-2, 20), max_size=5),
        "samples": json_like
        | st.dictionaries(st.sampled_from(["0", "1", "07", "a", "-1"]), st.lists(st.integers(-1, 9)), max_size=3),
        "id": json_like,
        "created": json_like,
        "extra": json_like,
    },
)


def _parse_or_request_error(obj):
    try:
        result = parse_request(obj)
    except RequestError:
        return None
    assert isinstance(result, UnlearningRequest)
    assert parse_request(result.to_json()) == result  # whatever parses round-trips
    return result


@settings(max_examples=200, deadline=None)
@given(st.one_of(near_valid, st.dictionaries(st.text(max_size=8), json_like, max_size=5)))
def test_fuzz_parse_dicts(obj):
    _parse_or_request_error(obj)
    try:
        text = json.dumps(obj)
    except ValueError:
        return
    _parse_or_request_error(text)


@settings(max_examples=100, deadline=None)
@given(json_like.filter(lambda x: not isinstance(x, str)))
def test_fuzz_parse_arbitrary_json_values(obj):
    _parse_or_request_error(obj)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet='{}[]":,0123456789 kindclassesamplesNaN-.', max_size=60).map(lambda s: "{" + s))
def test_fuzz_parse_json_text(text):
    _parse_or_request_error(text)


# --------------------------------------------------------------------------------------------------
# validation against dataset, clients and lineage
# --------------------------------------------------------------------------------------------------


def test_validate_lists_all_unknown_classes_at_once():
    r = UnlearningRequest.for_classes([3, 12, 15])
    problems = validate_request(r, num_classes=10, strict=False)
    assert [str(p) for p in problems] == ["Unknown classes [12, 15]; the dataset has classes 0-9"]
    with pytest.raises(RequestError, match=r"Unknown classes \[12, 15\]; the dataset has classes 0-9"):
        validate_request(r, num_classes=10)


def test_validate_valid_request_returns_no_problems():
    assert validate_request(UnlearningRequest.for_classes([3]), num_classes=10) == []


def test_validate_unknown_clients():
    r = UnlearningRequest.for_clients([1, 7, 9])
    with pytest.raises(RequestError, match=r"Unknown clients \[7, 9\]; known clients: 0-4"):
        validate_request(r, known_clients=range(5))


def test_validate_samples_a_client_does_not_hold():
    r = UnlearningRequest.for_samples({0: [1, 2, 99], 1: [5]})
    problems = validate_request(r, client_sample_ids={0: {1, 2, 3}}, strict=False)
    assert len(problems) == 2
    assert "Client 0 does not hold samples [99] (1 of 3 requested)" in str(problems[0])
    assert "No sample ids known for client 1" in str(problems[1])


def _small_graph() -> LineageGraph:
    g = LineageGraph()
    g.add_node("g0", "global", round=0)
    for c in range(2):
        g.add_node(f"c{c}", "local", round=1, parents=("g0",), owner=f"client:{c}",
                   data=TrainingData(c, {k: 3 for k in range(7)}))  # fmt: skip
    return g


def test_validate_reports_data_no_model_trained_on():
    with pytest.raises(RequestError, match=r"No model in the lineage trained on class 7 \(classes seen: 0-6\)"):
        validate_request(UnlearningRequest.for_classes([2, 7]), graph=_small_graph())
    with pytest.raises(RequestError, match="client 5"):
        validate_request(UnlearningRequest.for_clients([5]), graph=_small_graph())
    assert validate_request(UnlearningRequest.for_samples({1: [3]}), graph=_small_graph()) == []


def test_validate_samples_against_lineage_with_sample_ids():
    def ids_of(node):
        return {1, 2, 3}

    r = UnlearningRequest.for_samples({0: [9]})
    with pytest.raises(RequestError, match="requested samples of client 0"):
        validate_request(r, graph=_small_graph(), sample_ids_of=ids_of)


def test_validate_empty_lineage():
    with pytest.raises(RequestError, match="lineage is empty"):
        validate_request(UnlearningRequest.for_classes([1]), graph=LineageGraph())


def test_validate_strict_raises_all_problems_together():
    r = UnlearningRequest.for_classes([7, 12])
    with pytest.raises(RequestError, match="2 problems") as info:
        validate_request(r, num_classes=10, graph=_small_graph())
    assert len(info.value.problems) == 2
    assert "Unknown class [12]" in str(info.value) and "class 7" in str(info.value)


def test_validate_rejects_non_request():
    with pytest.raises(RequestError, match="expects an UnlearningRequest"):
        validate_request({"kind": "classes"})  # type: ignore[arg-type]


def test_frozen_map_equals_dict():
    assert FrozenMap({1: (2,)}) == {1: (2,)} and len(FrozenMap()) == 0


def test_path_argument_is_not_json(tmp_path):
    # A str that does not start with '{' or '[' is a path: the error says so instead of a JSON error.
    with pytest.raises(RequestError, match="not found"):
        parse_request(str(tmp_path / "x"))
