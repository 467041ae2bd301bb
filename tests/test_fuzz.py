"""Hypothesis fuzzing of what arrives from outside: request files and JSON, and message records.

Each property runs 500 examples and accepts exactly two outcomes: a valid result, or our own error type
(``RequestError`` for requests, ``RecordError`` for records). Any other exception fails the test.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fl_unlearn.errors import RecordError, RequestError
from fl_unlearn.requests import MAX_IDS, UnlearningRequest, parse_request, parse_samples_file
from strategies import records as R
from strategies.forget import ForgetSpec

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON-like values, biased towards what a request holds (ints, lists of ints, the real keys); small and cheap
# to draw, so 500 examples take a few seconds.
short_text = st.text(alphabet="ab-_.0123456789\x00\u00e9/", max_size=5)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), short_text,
                    st.sampled_from(["classes", "client", "samples", "7", "-1", "05", "1e3"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(short_text | st.sampled_from(["0", "3", "12"]), inner, max_size=3)),
    max_leaves=8)
keys = st.sampled_from(["kind", "classes", "clients", "samples", "id", "created", "extra"]) | short_text
request_like = st.dictionaries(keys, json_values, max_size=5)


def _outcome_of(call, *args) -> object:
    """The result, or the RequestError; anything else propagates and fails the test."""
    try:
        return call(*args)
    except RequestError as err:
        return err


@FUZZ
@given(request_like)
def test_parse_request_on_any_dict_returns_a_request_or_request_error(obj):
    result = _outcome_of(parse_request, obj)
    if isinstance(result, UnlearningRequest):  # what it accepted is well-formed and round-trips
        assert 0 < result.num_ids <= MAX_IDS
        assert parse_request(result.to_json()) == result


@FUZZ
@given(st.one_of(request_like.map(lambda d: json.dumps(d, allow_nan=True)),
                 st.text(max_size=30).map(lambda t: "{" + t)))
def test_parse_request_on_any_json_text_returns_a_request_or_request_error(text):
    result = _outcome_of(parse_request, text)
    assert isinstance(result, (UnlearningRequest, RequestError))


@pytest.fixture(scope="module")
def scratch() -> Path:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


samples_files = st.one_of(
    st.dictionaries(short_text | st.sampled_from(["0", "1", "-1", "01"]), json_values, max_size=3).map(
        lambda d: json.dumps(d, allow_nan=True).encode()),
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.binary(max_size=40),
)


@FUZZ
@given(samples_files)
def test_parse_samples_file_on_any_bytes_returns_samples_or_request_error(scratch, data):
    path = scratch / "samples.json"
    path.write_bytes(data)
    result = _outcome_of(parse_samples_file, path)
    if not isinstance(result, RequestError):
        assert result and all(isinstance(c, int) and c >= 0 and ids for c, ids in result.items())
        assert UnlearningRequest.for_samples(result).samples == result


# ------------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------------

numeric_or_not = st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(max_len=3), hnp.unicode_string_dtypes(max_len=3),
                           hnp.array_dtypes(max_size=2))
arrays = hnp.arrays(numeric_or_not, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))


def _raw_array(draw_dtype: str, shape: list[int], data: bytes) -> Array:
    return Array(dtype=draw_dtype, shape=tuple(shape), stype="numpy.ndarray", data=data)


raw_arrays = st.builds(_raw_array, st.sampled_from(["float32", "int64", "object", "<U2", "nonsense"]),
                       st.lists(st.integers(0, 5), max_size=3), st.binary(max_size=64))


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


@FUZZ
@given(st.dictionaries(st.sampled_from(["w", "fc.bias", "é"]), st.one_of(arrays.map(Array), raw_arrays), max_size=2))
def test_record_to_tensors_returns_tensors_or_record_error(entries):
    try:
        tensors = R.record_to_tensors(ArrayRecord(entries))
    except RecordError:
        return
    for name, tensor in tensors.items():
        expected = entries[name].numpy()
        assert isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == expected.shape
        assert np.array_equal(tensor.numpy(), expected, equal_nan=expected.dtype.kind == "f")


def test_record_with_a_pickled_object_array_is_refused_without_unpickling():
    payload = _npy_bytes(np.array([{"a": 1}, None], dtype=object))  # a pickle inside an .npy file
    record = ArrayRecord({"w": Array(dtype="object", shape=(2,), stype="numpy.ndarray", data=payload)})
    with pytest.raises(RecordError, match="'w'"):
        R.record_to_tensors(record)


config_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.booleans(), short_text,
    st.binary(max_size=5), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
    st.lists(st.floats(allow_nan=True), max_size=3), st.lists(st.booleans(), max_size=3),
    st.lists(short_text, max_size=3))
config_keys = st.sampled_from([R.HIST_CLASSES, R.HIST_COUNTS, R.FORGET_CLASSES, R.FORGET_SAMPLES, R.FORGET_ALL, "x"])


@FUZZ
@given(st.dictionaries(config_keys, config_values, max_size=5))
def test_config_decoding_returns_values_or_record_error(entries):
    config = ConfigRecord(entries)
    for decode in (R.histogram_from_config, ForgetSpec.from_config,
                   lambda c: R.int_list(c.get(R.FORGET_SAMPLES))):
        try:
            value = decode(config)
        except RecordError:
            continue
        if isinstance(value, dict):  # a histogram: non-negative ints both sides
            assert all(isinstance(k, int) and k >= 0 and isinstance(v, int) and v >= 0 for k, v in value.items())
