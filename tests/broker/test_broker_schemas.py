"""Message schemas: exact correspondence with harmony's step payloads, the no-labels rule, validation."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from broker_samples import SHA, sample_messages

from broker.errors import WireError
from broker.schemas import (
    KINDS,
    SCHEMAS,
    UPLOAD_KINDS,
    BlobChunk,
    InferReply,
    Personalise,
    check_channel,
    from_body,
    kind_of,
    to_body,
)
from harmony.algorithms.messages import FeatureGradDown, FeaturesUp, LogitGradUp, LogitsDown

STEP_PAYLOADS = {"features": FeaturesUp, "logits": LogitsDown, "logit_grad": LogitGradUp,
                 "feature_grad": FeatureGradDown}
LABEL_LIKE = re.compile(r"(^|_)(label|labels|y|target|targets|class|classes|cls)($|_)")
ALLOWED_LABEL_DERIVED = {"same_label": (torch.uint8,), "negative_pairs": (torch.int64,)}


def test_step_payloads_travel_field_for_field() -> None:
    for kind, cls in STEP_PAYLOADS.items():
        assert SCHEMAS[kind].cls is cls
        assert SCHEMAS[kind].field_names() == tuple(f.name for f in dataclasses.fields(cls)), kind
    for kind, spec in SCHEMAS.items():
        assert spec.field_names() == tuple(f.name for f in dataclasses.fields(spec.cls)), kind


def test_no_upload_schema_has_a_label_field() -> None:
    assert UPLOAD_KINDS == {"hello", "status", "features", "logit_grad", "infer", "eval_report", "error", "blob_chunk",
                            "link_probe"}
    for kind in UPLOAD_KINDS:
        for spec in SCHEMAS[kind].fields:
            if spec.name in ALLOWED_LABEL_DERIVED:
                # label-derived, never labels: 0/1 indicators and index pairs, validated below
                assert kind == "features" and spec.dtypes == ALLOWED_LABEL_DERIVED[spec.name]
                continue
            if (kind, spec.name) == ("hello", "device_class"):
                # the device's hardware class (a harmony/profiles.yaml name), not a sample's class:
                # a short identifier string, it cannot carry labels
                assert spec.type == "str" and spec.pattern is not None and spec.max_len == 64
                continue
            assert not LABEL_LIKE.search(spec.name), f"{kind}.{spec.name} looks like a label field"
            if spec.type == "tensor":  # every other uploaded tensor is floating point
                assert all(d.is_floating_point for d in spec.dtypes), f"{kind}.{spec.name}"


def test_labels_cannot_ride_along_in_an_upload() -> None:
    body = to_body(sample_messages()["features"])
    with pytest.raises(WireError, match="^body.labels: unknown field"):
        from_body("features", {**body, "labels": torch.tensor([1, 2, 3, 4])})
    with pytest.raises(WireError, match="^body.grad_logits: expected dtype float32, got int64"):
        from_body("logit_grad", {"step": 0, "grad_logits": torch.tensor([[3], [1]])})
    with pytest.raises(WireError, match="^body.same_label: expected only 0/1"):
        from_body("features", {**body, "same_label": torch.tensor([3, 1, 4, 1], dtype=torch.uint8)})


def test_kind_of_and_round_trip_through_bodies() -> None:
    for kind, msg in sample_messages().items():
        assert kind_of(msg) == kind
        back = from_body(kind, to_body(msg))
        assert type(back) is type(msg)


@pytest.mark.parametrize(("kind", "change", "field"), [
    ("features", {"features": torch.zeros(0, 8, 3, 3, dtype=torch.float16)}, "body.features"),
    ("features", {"view_depth": None}, "body.view_depth"),
    ("features", {"same_label": torch.ones(5, dtype=torch.uint8)}, "body.same_label"),
    ("features", {"negative_pairs": torch.tensor([[-1, 0]])}, "body.negative_pairs"),
    ("features", {"depth": 0}, "body.depth"),
    ("logits", {"logits": torch.zeros(4, 10, dtype=torch.float16)}, "body.logits"),
    ("logits", {"logits": torch.zeros(4, 10, 1)}, "body.logits"),
    ("logit_grad", {"grad_logits": torch.zeros(4)}, "body.grad_logits"),
    ("feature_grad", {"scale_exp": 400}, "body.scale_exp"),
    ("feature_grad", {"scale_exp": 1.5}, "body.scale_exp"),
    ("feature_grad", {"grad_features": torch.zeros(4, 8, dtype=torch.float64)}, "body.grad_features"),
    ("infer", {"features": torch.zeros(3, dtype=torch.float16)}, "body.features"),
    ("infer_reply", {"predictions": torch.zeros(3, dtype=torch.int32)}, "body.predictions"),
    ("infer_reply", {"logits": torch.zeros(2, 10)}, "body.logits"),
    ("hello", {"cores": 0}, "body.cores"),
    ("hello", {"battery": 140.0}, "body.battery"),
    ("hello", {"gflops": float("nan")}, "body.gflops"),
    ("hello", {"cpus": 0.0}, "body.cpus"),
    ("status", {"state": "On Line"}, "body.state"),
    ("assign", {"config_digest": "abc"}, "body.config_digest"),
    ("round_start", {"steps": 0}, "body.steps"),
    ("personalise", {"model_sha256": "xyz"}, "body.model_sha256"),
    ("evaluate", {"rhos": [0.5, 1.5]}, "body.rhos"),
    ("evaluate", {"fixed_tau": -0.1}, "body.fixed_tau"),
    ("eval_report", {"accuracy": [0.9]}, "body.accuracy"),
    ("eval_report", {"offload_probability_fixed_tau": [0.3, 1.5]}, "body.offload_probability_fixed_tau"),
    ("eval_report", {"rhos": [], "accuracy": [], "tau": [], "offload_probability": [], "accuracy_fixed_tau": [],
                     "offload_probability_fixed_tau": []}, "body.rhos"),
    ("eval_report", {"server_latency_s": float("inf")}, "body.server_latency_s"),
    ("error", {"code": "Bad Code"}, "body.code"),
    ("blob_chunk", {"index": 3}, "body.index"),
    ("blob_chunk", {"data": "text"}, "body.data"),
    ("event", {"fields": {"x": [1, 2]}}, "body.fields.x"),
    ("event", {"fields": {"bad key": 1}}, "body.fields"),
])
def test_validation_names_the_field_both_ways(kind: str, change: dict[str, object], field: str) -> None:
    msg = dataclasses.replace(sample_messages()[kind], **change)  # type: ignore[type-var]
    with pytest.raises(WireError) as err:
        to_body(msg)
    assert err.value.field == field
    body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    with pytest.raises(WireError) as err:
        from_body(kind, body)
    assert err.value.field == field


def test_missing_and_unknown_fields() -> None:
    with pytest.raises(WireError, match="^body.model_sha256: missing"):
        from_body("personalise", {})
    with pytest.raises(WireError, match="^kind: unknown message kind 'gossip'"):
        from_body("gossip", {})
    with pytest.raises(WireError, match="^body: expected a map"):
        from_body("stop", ["x"])
    assert from_body("infer_reply", {"ref_seq": 1, "predictions": torch.tensor([2])}).logits is None
    hello = to_body(sample_messages()["hello"])
    del hello["cpus"]  # an agent from before the field
    assert from_body("hello", hello).cpus is None


def test_channels() -> None:
    check_channel("features", "up")
    check_channel("blob_chunk", "blob")
    for kind, channel in [("logits", "up"), ("features", "down"), ("assign", "up"), ("hello", "cmd")]:
        with pytest.raises(WireError, match="^kind"):
            check_channel(kind, channel)
    assert {k for k in KINDS if "cmd" in SCHEMAS[k].channels} == {"assign", "round_start", "personalise", "evaluate",
                                                                 "stop", "cancel"}


def test_messages_are_plain_dataclasses() -> None:
    assert Personalise(model_sha256=SHA).model_sha256 == SHA
    assert BlobChunk(sha256=SHA, index=0, count=1, data=b"").data == b""
    assert InferReply(ref_seq=0, predictions=torch.tensor([1])).logits is None
