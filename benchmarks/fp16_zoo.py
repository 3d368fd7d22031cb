#!/usr/bin/env python3
"""The fp16 preset on a zoo of torch exports: valid, loadable, accurate, or refused with a reason.

Usage (needs torch and torchvision, which are not project dependencies)::

    python benchmarks/fp16_zoo.py --out /tmp/zoo [--models mobilenet_v3_small,swin_t,...]

Each model (random weights from a fixed seed) is exported with ``torch.onnx.export(dynamo=False,
opset_version=17)`` and dynamic batch, then converted with ``onnxmp.optimize(..., "fp16")``
(target cuda: the fusions, then precision) and its validation gates. A row says whether the
output passes onnx.checker's full check and loads in onnxruntime, its relative L2 error against
the FP32 model on the CPU provider (which computes float16 ops in float32, so this checks the
graph rewriting, not float16 range), what the fusions made, and how many casts it has; or the
error onnxmp refused with. Architectures cover what the fusions must leave alone as well as what
they must fuse: depthwise and squeeze-excitation CNNs, ConvNeXt's LayerNorm over channels,
Swin's windowed attention with a relative position bias, a causal transformer decoder, an
encoder with a key-padding mask, a CRNN text recognizer (Conv + bidirectional LSTM), and small
transformers GPT-2, T5 encoder (RMSNorm, relative position bias) and Llama (RMSNorm, rotary
embeddings, grouped-query attention) with padding masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxmp import api  # noqa: E402


def _torch():
    import torch

    return torch


def torchvision_model(name: str):
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None), (1, 3, 224, 224)

    return build


def crnn():
    torch = _torch()
    nn = torch.nn

    class CRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn = nn.Sequential(
                nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d((2, 1)),
                nn.Conv2d(64, 128, 3, 1, 1), nn.BatchNorm2d(128), nn.ReLU(), nn.AvgPool2d((8, 1)),
            )
            self.rnn = nn.LSTM(128, 96, bidirectional=True, batch_first=True)
            self.head = nn.Linear(192, 40)

        def forward(self, x):
            features = self.cnn(x).squeeze(2).permute(0, 2, 1)
            return self.head(self.rnn(features)[0]).log_softmax(-1)

    return CRNN(), (1, 1, 32, 128)


def encoder_with_padding_mask():
    torch = _torch()
    nn = torch.nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, activation="gelu")
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x, keep):
            return self.encoder(x, src_key_padding_mask=keep == 0)

    return Encoder(), ((1, 16, 64), ("keep", (1, 16)))


def causal_decoder():
    torch = _torch()
    nn = torch.nn

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x):
            causal = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf")), diagonal=1)
            return self.blocks(x, mask=causal, is_causal=True)

    return Decoder(), (1, 16, 64)


def hf_model(kind: str):
    """A small randomly initialized transformers model returning its last hidden state."""

    def build():
        torch = _torch()
        import transformers

        config = {
            "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64),
            "t5": lambda: transformers.T5Config(num_layers=2, d_model=64, d_kv=16, num_heads=4, d_ff=128, vocab_size=500),
            "llama": lambda: transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=128, vocab_size=500),
            "bert": lambda: transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                    intermediate_size=128, vocab_size=500, max_position_embeddings=64),
            "distilbert": lambda: transformers.DistilBertConfig(n_layers=2, dim=64, n_heads=4, hidden_dim=128, vocab_size=500,
                                                                max_position_embeddings=64),
            "roberta": lambda: transformers.RobertaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                          intermediate_size=128, vocab_size=500, max_position_embeddings=66),
        }[kind]()
        config._attn_implementation = "eager"
        inner = (transformers.T5EncoderModel if kind == "t5" else transformers.AutoModel.from_config)(config)

        class Hidden(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, keep):
                return self.inner(input_ids=input_ids, attention_mask=keep, use_cache=False).last_hidden_state \
                    if kind != "t5" else self.inner(input_ids=input_ids, attention_mask=keep).last_hidden_state

        return Hidden(), (("input_ids", (1, 16)), ("keep", (1, 16)))

    return build


MODELS = {
    "mobilenet_v3_small": torchvision_model("mobilenet_v3_small"),
    "efficientnet_b0": torchvision_model("efficientnet_b0"),
    "convnext_tiny": torchvision_model("convnext_tiny"),
    "regnet_y_400mf": torchvision_model("regnet_y_400mf"),
    "swin_t": torchvision_model("swin_t"),
    "crnn": crnn,
    "encoder_padding_mask": encoder_with_padding_mask,
    "causal_decoder": causal_decoder,
    "gpt2": hf_model("gpt2"),
    "t5_encoder": hf_model("t5"),
    "llama": hf_model("llama"),
    "bert": hf_model("bert"),
    "distilbert": hf_model("distilbert"),
    "roberta": hf_model("roberta"),
}


def export(name: str, path: Path) -> list[tuple[str, tuple, np.dtype]]:
    """Export ``name`` to ``path``; returns (input name, shape, dtype) for the feeds."""
    torch = _torch()
    torch.manual_seed(0)
    module, spec = MODELS[name]()
    module.eval()
    specs = spec if isinstance(spec[0], tuple) else (spec,)
    inputs, names, dynamic = [], [], {}
    for index, item in enumerate(specs):
        input_name, shape = (item if isinstance(item[0], str) else (f"x{index}", item))
        if input_name == "keep":
            inputs.append(torch.ones(shape, dtype=torch.int64))
        elif input_name == "input_ids":
            inputs.append(torch.randint(0, 500, shape))
        else:
            inputs.append(torch.randn(shape))
        names.append(input_name)
        dynamic[input_name] = {0: "batch"}
    mha = getattr(torch.backends, "mha", None)
    if mha is not None and hasattr(mha, "set_fastpath_enabled"):
        mha.set_fastpath_enabled(False)  # the fused fast path has no ONNX export
    with torch.no_grad():
        torch.onnx.export(module, tuple(inputs), str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=["y"], dynamic_axes={**dynamic, "y": {0: "batch"}})
    return [(n, tuple(t.shape), np.int64 if t.dtype == torch.int64 else np.float32) for n, t in zip(names, inputs)]


def feeds(specs, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape, dtype in specs:
        shape = (batch,) + tuple(shape[1:])
        if name == "input_ids":
            out[name] = rng.integers(0, 500, shape).astype(np.int64)
        elif dtype == np.int64:  # a padding mask: every row keeps at least its first half
            mask = np.ones(shape, np.int64)
            mask[:, shape[1] // 2 + rng.integers(0, shape[1] // 2):] = 0
            out[name] = mask
        else:
            out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


def check(name: str, out: Path) -> dict:
    import onnxruntime as ort

    row: dict = {"model": name}
    fp32 = out / f"{name}.fp32.onnx"
    fp16 = out / f"{name}.fp16.onnx"
    start = time.time()
    specs = export(name, fp32)
    row["export_s"] = round(time.time() - start, 1)
    data = out / f"{name}.data"
    data.mkdir(exist_ok=True)
    for index in range(4):
        np.savez(data / f"batch_{index:03d}.npz", **feeds(specs, 2, index))
    start = time.time()
    try:
        result = api.optimize(fp32, fp16, "fp16", validation_data=data)
    except Exception as exc:  # noqa: BLE001 - a refusal is a result; its message is what users see
        row.update(status="refused", error=str(exc).splitlines()[0][:300], written=fp16.exists())
        return row
    row["convert_s"] = round(time.time() - start, 1)
    proto = onnx.load(str(fp16))
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in proto.graph.node)
    row["fused"] = {k: v for k, v in ops.items() if k.startswith("com.microsoft")}
    row["casts"] = ops.get("Cast", 0)
    test = feeds(specs, 3, 99)
    want = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, test)[0]
    options = ort.SessionOptions()  # level "all" crashes onnxruntime's CPU provider on some float16
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # graphs (see validate.py)
    got = ort.InferenceSession(str(fp16), options, providers=["CPUExecutionProvider"]).run(None, test)[0]
    finite = np.isfinite(want)
    row["rel_l2"] = float(np.linalg.norm((got - want)[finite]) / max(np.linalg.norm(want[finite]), 1e-12))
    row["nan"] = bool(np.isnan(got[finite]).any())
    row["status"] = "ok"
    row["validation"] = {k: v.get("rel_l2_error") for k, v in (result.report.get("validation", {}).get("outputs") or {}).items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        try:
            row = check(name, args.out)
        except Exception as exc:  # noqa: BLE001 - a broken export or model is reported, the zoo goes on
            row = {"model": name, "status": "error", "error": "".join(traceback.format_exception_only(exc)).strip()[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | status | rel L2 vs FP32 (CPU) | NaN | casts | fused |")
    print("|---|---|---:|---|---:|---|")
    for r in rows:
        fused = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in (r.get("fused") or {}).items()) or "-"
        rel = f"{r['rel_l2']:.1e}" if "rel_l2" in r else "-"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:120]}"
        print(f"| {r['model']} | {status} | {rel} | {'yes' if r.get('nan') else 'no'} | {r.get('casts', '-')} | {fused} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
