"""The msgpack codec: tensor ext type, envelope round trips of every kind, and malformed input."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from broker_samples import sample_messages
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codec import (
    DTYPE_CODES,
    TENSOR_EXT_CODE,
    WIRE_VERSION,
    Envelope,
    check_origin,
    decode,
    decode_tensor,
    encode,
    encode_tensor,
    error_report,
    make_envelope,
)
from broker.errors import WireError
from broker.limits import MAX_MESSAGE_BYTES
from broker.schemas import KINDS
from broker.topics import DEFAULT_TOPICS
from harmony.algorithms.messages import FeaturesUp

WIRE_DTYPES = list(DTYPE_CODES)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**40)), min(info.max, 2**40), shape, generator=g, dtype=torch.int64).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def assert_same_message(a: object, b: object) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert same_bits(x.contiguous(), y), f.name
        else:
            assert x == y, f.name


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(WIRE_DTYPES), shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
       seed=st.integers(0, 2**16))
def test_tensor_ext_round_trip_is_bit_exact(dtype: torch.dtype, shape: list[int], seed: int) -> None:
    t = random_tensor(dtype, tuple(shape), seed)
    packed = msgpack.packb(msgpack.ExtType(TENSOR_EXT_CODE, encode_tensor(t)), use_bin_type=True)
    ext = msgpack.unpackb(packed)
    assert ext.code == TENSOR_EXT_CODE
    back = decode_tensor(ext.data)
    assert same_bits(t, back)
    assert back.is_contiguous()
    if back.dtype == torch.bool:  # writable and owning its memory
        back.logical_not_()
    else:
        back.add_(1)


def test_tensor_layout_is_documented_header_plus_little_endian_bytes() -> None:
    t = torch.tensor([[1.0, -2.0, 3.5]], dtype=torch.float32)
    payload = encode_tensor(t)
    assert payload[:2] == bytes([2, 2])
    assert struct.unpack_from("<2I", payload, 2) == (1, 3)
    assert payload[10:] == np.array([1.0, -2.0, 3.5], dtype="<f4").tobytes()


def test_channels_last_and_strided_tensors_are_made_contiguous() -> None:
    x = torch.randn(2, 3, 4, 5)
    for t in (x.to(memory_format=torch.channels_last), x.transpose(1, 3), x[:, :, ::2]):
        back = decode_tensor(encode_tensor(t))
        assert back.is_contiguous() and torch.equal(back, t)


@pytest.mark.parametrize("feature_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips(kind: str, feature_dtype: torch.dtype) -> None:
    msg = sample_messages(feature_dtype)[kind]
    dev = "" if kind in ("event", "blob_chunk") else "pi-3"
    round_ = getattr(msg, "round", 4)
    env = make_envelope(msg, dev=dev, seq=17, round=round_)
    back = decode(encode(env))
    assert (back.v, back.kind, back.dev, back.round, back.step, back.seq) == (WIRE_VERSION, kind, dev, round_,
                                                                              env.step, 17)
    assert back.ts == env.ts
    assert_same_message(msg, back.body)


def test_sample_messages_cover_every_kind() -> None:
    assert set(sample_messages()) == KINDS


# --------------------------------------------------------------------------- malformed input
def features_env(**body: Any) -> Envelope:
    msg = sample_messages()["features"]
    return make_envelope(dataclasses.replace(msg, **body), dev="a", seq=1, round=1)  # type: ignore[type-var]


def raw_message(**overrides: Any) -> dict[str, Any]:
    """A valid features message as a plain msgpack-able dict (tensors as ext), to corrupt field by field."""
    wire = msgpack.unpackb(encode(features_env()), raw=False)
    wire.update(overrides)
    return wire


def corrupt_body(**fields: Any) -> bytes:
    wire = raw_message()
    wire["body"].update(fields)
    return msgpack.packb(wire, use_bin_type=True)


def ext(t: torch.Tensor) -> msgpack.ExtType:
    return msgpack.ExtType(TENSOR_EXT_CODE, encode_tensor(t, allow_nonfinite=True))


def field_of(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(WireError) as err:
        decode(data, **kwargs)
    assert str(err.value).startswith(err.value.field + ": ")
    return err.value.field


@pytest.mark.parametrize(("overrides", "field"), [
    ({"v": 2}, "v"),
    ({"v": "1"}, "v"),
    ({"kind": "gossip"}, "kind"),
    ({"kind": 3}, "kind"),
    ({"dev": "a/b"}, "dev"),
    ({"dev": ""}, "dev"),
    ({"round": -1}, "round"),
    ({"step": -2}, "step"),
    ({"seq": -3}, "seq"),
    ({"seq": 1.5}, "seq"),
    ({"seq": True}, "seq"),
    ({"ts": float("nan")}, "ts"),
    ({"body": [1, 2]}, "body"),
    ({"step": 5}, "step"),  # envelope step differs from body.step
    ({"extra": 1}, "extra"),
])
def test_bad_envelope_fields_are_named(overrides: dict[str, Any], field: str) -> None:
    assert field_of(msgpack.packb(raw_message(**overrides), use_bin_type=True)) == field


def test_missing_envelope_field_is_named() -> None:
    wire = raw_message()
    del wire["seq"]
    assert field_of(msgpack.packb(wire, use_bin_type=True)) == "seq"


@pytest.mark.parametrize(("data", "field"), [
    (b"", "message"),
    (b"\xc1", "message"),
    (msgpack.packb([1, 2, 3]), "message"),
    ("not bytes", "message"),
])
def test_not_a_message(data: Any, field: str) -> None:
    assert field_of(data) == field


def test_truncated_bytes() -> None:
    data = encode(features_env())
    for cut in (1, 7, len(data) // 2, len(data) - 1):
        assert field_of(data[:cut]) == "message"


def test_oversize_payload_refused_before_parsing() -> None:
    big = FeaturesUp(step=0, depth=2, features=torch.zeros(1100, 1024, 4, dtype=torch.float16))  # ~8.6 MiB
    with pytest.raises(WireError, match="^message: encoded size"):
        encode(make_envelope(big, dev="a", seq=1))
    data = encode(make_envelope(big, dev="a", seq=1), max_bytes=16 << 20)
    assert len(data) > MAX_MESSAGE_BYTES
    assert field_of(data) == "message"
    assert decode(data, 16 << 20).body.features.shape == (1100, 1024, 4)
    assert field_of(encode(features_env()), max_bytes=100) == "message"


def test_nan_and_inf_rejected_unless_allowed() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(4, 8, 3, 3, dtype=torch.float16)
        t[1, 2, 0, 0] = bad
        data = corrupt_body(features=ext(t))
        assert field_of(data) == "body.features"
        assert torch.equal(decode(data, allow_nonfinite=True).body.features.isnan(), t.isnan())
        with pytest.raises(WireError, match="^body.features: expected finite"):
            encode(features_env(features=t))
    logits = torch.zeros(4, 10)
    logits[0, 0] = float("nan")
    data = msgpack.packb({**raw_message(kind="logits"), "body": {"step": 2, "logits": ext(logits)}})
    assert field_of(data) == "body.logits"


@pytest.mark.parametrize(("body", "field"), [
    ({"features": ext(torch.zeros(4, 8, dtype=torch.int64))}, "body.features"),  # label-like ints
    ({"features": ext(torch.zeros(4, 8, dtype=torch.float64))}, "body.features"),
    ({"features": ext(torch.zeros(4, dtype=torch.float16))}, "body.features"),  # < 2 dims
    ({"features": [1.0, 2.0]}, "body.features"),
    ({"same_label": ext(torch.tensor([0, 1, 2, 1], dtype=torch.uint8))}, "body.same_label"),
    ({"same_label": ext(torch.tensor([0, 1, 1], dtype=torch.uint8))}, "body.same_label"),
    ({"same_label": ext(torch.tensor([0, 1, 1, 0], dtype=torch.int64))}, "body.same_label"),
    ({"same_label": ext(torch.tensor([0, 1, 1, 0], dtype=torch.bool))}, "body.same_label"),
    ({"labels": ext(torch.tensor([3, 1, 4, 1]))}, "body.labels"),  # a label field simply does not exist
    ({"y": ext(torch.tensor([3, 1, 4, 1]))}, "body.y"),
    ({"negative_pairs": ext(torch.tensor([[0, 9]]))}, "body.negative_pairs"),
    ({"negative_pairs": ext(torch.tensor([3, 1, 4, 1]))}, "body.negative_pairs"),
    ({"view_depth": 7}, "body.view_depth"),  # deeper than the split depth
    ({"view_depth": None}, "body.view_depth"),  # view features without their depth
    ({"view_features": ext(torch.zeros(3, 16, 5, 5, dtype=torch.float16))}, "body.view_features"),
    ({"depth": "3"}, "body.depth"),
    ({"step": None}, "body.step"),
    ({"features": msgpack.ExtType(5, b"\x00")}, "body.features"),
    ({"features": msgpack.ExtType(TENSOR_EXT_CODE, b"\x02")}, "body.features"),  # truncated header
    ({"features": msgpack.ExtType(TENSOR_EXT_CODE, b"\x09\x01\x01\x00\x00\x00\x00")}, "body.features"),  # dtype
    ({"features": msgpack.ExtType(TENSOR_EXT_CODE, encode_tensor(torch.zeros(4, 8))[:-1])}, "body.features"),
])
def test_bad_feature_bodies_are_named(body: dict[str, Any], field: str) -> None:
    assert field_of(corrupt_body(**body)) == field


def test_body_errors_reference_the_message() -> None:
    with pytest.raises(WireError) as err:
        decode(corrupt_body(same_label=ext(torch.tensor([0, 1, 2, 1], dtype=torch.uint8))))
    assert (err.value.field, err.value.dev, err.value.kind, err.value.seq) == ("body.same_label", "a", "features", 1)
    assert "0/1" in str(err.value)


def test_bool_tensor_bytes_must_be_0_or_1() -> None:
    payload = bytearray(encode_tensor(torch.tensor([True, False])))
    payload[-1] = 7
    with pytest.raises(WireError, match="^x: expected bool bytes"):
        decode_tensor(bytes(payload), field="x")


def test_encode_validates_too() -> None:
    with pytest.raises(WireError, match="^body.same_label"):
        encode(features_env(same_label=torch.tensor([0, 1, 5, 1], dtype=torch.uint8)))
    with pytest.raises(WireError, match="^kind"):
        encode(dataclasses.replace(features_env(), kind="logits"))
    with pytest.raises(WireError, match="^seq"):
        encode(dataclasses.replace(features_env(), seq=-1))
    with pytest.raises(WireError, match="^body: no wire schema"):
        make_envelope(object(), dev="a", seq=1)
    with pytest.raises(WireError, match="unsupported tensor dtype bfloat16"):
        encode_tensor(torch.zeros(2, dtype=torch.bfloat16))


def test_empty_negative_pairs_and_error_reports() -> None:
    env = decode(encode(features_env(negative_pairs=torch.zeros((0, 2), dtype=torch.int64))))
    assert env.body.negative_pairs.shape == (0, 2)
    with pytest.raises(WireError) as err:
        decode(corrupt_body(same_label=ext(torch.tensor([0, 1, 2, 1], dtype=torch.uint8))))
    report = error_report(err.value)
    assert (report.code, report.field, report.ref_seq) == ("bad_schema", "body.same_label", 1)
    assert decode(encode(make_envelope(report, dev="a", seq=2))).body == report


def test_check_origin_matches_topic_and_channel() -> None:
    env = decode(encode(features_env()))
    check_origin(env, DEFAULT_TOPICS.parse(DEFAULT_TOPICS.up("a")))
    with pytest.raises(WireError, match="^dev"):
        check_origin(env, DEFAULT_TOPICS.parse(DEFAULT_TOPICS.up("b")))
    with pytest.raises(WireError, match="^kind: kind 'features' is not allowed on the 'down'"):
        check_origin(env, DEFAULT_TOPICS.parse(DEFAULT_TOPICS.down("a")))
