"""Sample messages and credentials shared by the wire-layer tests (imported by name: tests/broker is on sys.path)."""

from __future__ import annotations

from typing import Any

import torch

from broker.schemas import (
    Assign,
    BlobChunk,
    Cancel,
    ErrorReport,
    EvalReport,
    Evaluate,
    Event,
    Hello,
    InferReply,
    InferRequest,
    LinkProbe,
    Personalise,
    RoundStart,
    Status,
    Stop,
)
from harmony.algorithms.messages import FeatureGradDown, FeaturesUp, LogitGradUp, LogitsDown

PASSWORDS = {"a": "pw-a", "b": "pw-b", "server": "pw-server", "orchestrator": "pw-orch"}
SHA = "ab" * 32


def sample_messages(feature_dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """One valid message object per kind."""
    g = torch.Generator().manual_seed(0)
    return {
        "hello": Hello(agent_version="0.1.0", cores=4, freq_mhz=1500.0, memory_bytes=4 << 30, load=0.5,
                       gflops=12.5, rtt_ms=0.8, uplink_bps=1.25e6, battery=87.0, cpus=3.5,
                       rates={"conv": 2.5e9, "depthwise": 1e9, "attention": 4e9}),
        "link_probe": LinkProbe(payload=b"\0" * 1024),
        "status": Status(state="online", detail="ready"),
        "assign": Assign(split_depth=3, config_digest=SHA),
        "round_start": RoundStart(round=4, steps=10, client_model_sha256=SHA),
        "features": FeaturesUp(
            step=2, depth=3, features=torch.randn(4, 8, 3, 3, generator=g).to(feature_dtype), view_depth=2,
            view_features=torch.randn(4, 16, 5, 5, generator=g).to(feature_dtype),
            same_label=torch.tensor([1, 0, 0, 1], dtype=torch.uint8),
            negative_pairs=torch.tensor([[0, 1], [3, 2]], dtype=torch.int64)),
        "logits": LogitsDown(step=2, logits=torch.randn(4, 10, generator=g)),
        "logit_grad": LogitGradUp(step=2, grad_logits=torch.randn(4, 10, generator=g)),
        "feature_grad": FeatureGradDown(step=2, grad_features=torch.randn(4, 8, 3, 3, generator=g).to(feature_dtype),
                                        scale_exp=12),
        "infer": InferRequest(depth=2, features=torch.randn(3, 5, generator=g).to(feature_dtype), want_logits=True),
        "infer_reply": InferReply(ref_seq=9, predictions=torch.tensor([1, 7, 3]),
                                  logits=torch.randn(3, 10, generator=g)),
        "personalise": Personalise(model_sha256=SHA),
        "evaluate": Evaluate(model_sha256=SHA, rhos=[0.0, 0.5], entropy_thresholds=[0.05, 2.3], fixed_tau=0.5),
        "eval_report": EvalReport(rhos=[0.0, 0.5], accuracy=[0.9, 0.625], tau=[0.4, 1.2],
                                  offload_probability=[0.2, 0.45], accuracy_fixed_tau=[0.85, 0.6],
                                  offload_probability_fixed_tau=[0.3, 0.5], fixed_tau=0.5, samples=40,
                                  client_latency_s=0.0012, server_latency_s=0.004),
        "stop": Stop(reason="done"),
        "cancel": Cancel(round=3, reason="session_failed"),
        "error": ErrorReport(code="schema", field="body.features", message="bad dtype", ref_seq=3),
        "blob_chunk": BlobChunk(sha256=SHA, index=1, count=3, data=b"\x00\x01weights"),
        "event": Event(name="round.started", fields={"round": 4, "participants": 8, "quorum": 0.75, "note": None}),
    }
