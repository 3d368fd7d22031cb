#!/usr/bin/env python3
"""GPU FP16 benchmark: onnxmp's ``fp16`` preset against FP32 and two peers, on onnxruntime.

Usage::

    # on the device, warm machine (../shared/gpu/README.md), timeout 600 s:
    source /tmp/chunks/install.sh && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_fp16.py --out /tmp/gpu_fp16
    # chained after the install in the same call, leave it room: add --deadline-s 450
    # CPU smoke run with small stand-in models:
    python benchmarks/gpu_fp16.py --out /tmp/gb --models tiny --provider cpu --repeats 3 --warmup 1

Models (exported once to ``--out`` with ``torch.onnx.export(dynamo=False, opset_version=17)``
and reused while the file is there; random weights, seeded):

- ``resnet50``  torchvision ``resnet50(weights=None)``, input [batch, 3, 224, 224].
- ``bert``      transformers ``BertModel(BertConfig())`` (BERT-base, eager attention, the form
  onnxruntime's transformer optimizer fuses), inputs input_ids / attention_mask / token_type_ids
  int64 [batch, sequence], sequence 128; outputs last_hidden_state, pooler_output.
- ``vit``       torchvision ``vit_b_16(weights=None)``, input [batch, 3, 224, 224]; its classifier
  head, which torchvision initializes to zeros, is re-initialized so the logits are not all 0.
- ``tiny``      small stand-ins for a CPU smoke run: ``tiny-cnn`` and ``tiny-vit`` (torch),
  ``tiny-bert`` (transformers); without torch/transformers, or with ``--tiny-source fixtures``,
  fixtures/models/cnn_bn_residual.onnx, transformer_block.onnx and tiny_transformer.onnx.

Variants, each converted anew on every run from the same FP32 export:

- ``fp32``              the export as is, in a session with onnxruntime's default CUDA options (no
                        NHWC, no fused conv bias, no CUDA graph): what a user gets without onnxmp,
                        and the baseline of every ratio, as the issues measured their peers;
- ``fp32-static``       the fp32 preset with ``specialize-shapes`` (batch and sequence fixed), timed
                        with the same session hand-off as ``onnxmp-static`` (NHWC and fused conv
                        bias for convolution-heavy models, CUDA graph): shows how much of
                        ``onnxmp-static``'s ratio is FP16 and how much is the hand-off;
- ``onnxmp``            ``onnxmp.api.optimize(src, dst, "fp16")`` (target cuda, keep_io_types; the
                        preset holds the fusion passes, so this is "onnxmp FP16 fused"),
                        its validation gates fed with the benchmark's own realistic inputs
                        (``--onnxmp-validation``); when a gate fails the row says so and the model
                        is rebuilt without gates so that its speed is still measured;
- ``onnxmp-static``     the same preset with ``specialize-shapes`` fixing batch (and sequence), one
                        model per batch (``onnxmp optimize --policy fp16 --fix-dim batch=B
                        --fix-dim sequence=S``), no gates; timed with ``cuda_graph=None``: the
                        session captures a CUDA graph when every node can run on CUDA (the
                        ``graph`` column; the row's ``session_notes`` say why not);
- ``occ``               ``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)``;
- ``ort-transformers``  ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert" or
                        "vit", num_heads=12, hidden_size=768, use_gpu=True)`` then
                        ``convert_float_to_float16(keep_io_types=True)``; n/a for ResNet-50.

Work order: every model's ``fp32``, ``onnxmp`` and ``onnxmp-static`` first, the peers after, so
that a run cut short by ``--deadline-s`` loses the least important rows; the table is sorted.

Roofline: each model's FLOPs at each batch are counted once with
``torch.utils.flop_counter.FlopCounterMode`` on the device (kept in the export's sidecar JSON);
a row shows FLOPs / median time in TFLOP/s and the percentage of the GPU's dense tensor-core
peak (``PEAK_TFLOPS`` by nvidia-smi's name, or ``--peak-tflops FP16,TF32``): the FP16 peak for
FP16 rows, the TF32 peak for FP32 rows, since onnxruntime's CUDA provider computes float32
MatMul/Conv in TF32 by default (``use_tf32=1``; the session's effective value is checked).

For every model x batch x variant: ``onnxmp.runtime.benchmark`` (I/O binding on CUDA, warm-up,
median of ``--repeats``), the speed-up against FP32 of the same model and batch, and accuracy
against FP32 on the same inputs: relative L2 error and max abs error of the first output, NaN/Inf
in any output, and the number of Cast nodes. Integer inputs are realistic in both: attention
masks all ones, token types zeros, token ids random. One failure never stops the run: it becomes
the row's status ("convert failed: ...", "load failed: ...").

Each model x variant runs in its own worker process (this script with ``--worker JOB.json``):
a converter or onnxruntime that crashes (a segfault is possible on a malformed model) costs only
that variant's rows, whose status names the signal and the phase ("crashed (signal SIGSEGV)
loading/running the model"). Past ``--deadline-s`` (default 480 s) the remaining work is
skipped and the table is still printed, inside the device's 600 s limit per command. Targets:
the FP16 issue's (batch 32: ViT >= 2.5x, ResNet-50 >= 2.0x, BERT at least as fast as the
transformer optimizer) and the kernel-fusion issue's (batch 32, best onnxmp variant within the
fp16 preset's 1e-2 gate: ResNet-50 >= 2.5x, BERT >= 2.5x, ViT >= 3.2x; batch 1 faster than
every peer that ran; BERT's and ViT's static variants captured as CUDA graphs).

The table is printed last; all numbers go to ``DIR/gpu_fp16.json`` (rewritten after every row,
so a run that is cut short keeps what it measured), the table to ``DIR/gpu_fp16.txt``, and both
to ``$OUT`` as well when the ``OUT`` environment variable is set. Per-job files (job, result,
worker stderr) are in ``DIR/jobs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
try:
    import onnxmp  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT))
    import onnxmp  # noqa: F401

from onnxmp import runtime as rt  # noqa: E402
from onnxmp.ir import iter_proto_nodes  # noqa: E402

FULL_MODELS = ("resnet50", "bert", "vit")
TINY_MODELS = ("tiny-cnn", "tiny-bert", "tiny-vit")
VARIANTS = ("fp32", "fp32-static", "onnxmp", "onnxmp-static", "occ", "ort-transformers")
STATIC_VARIANTS = ("fp32-static", "onnxmp-static")  # one model per batch, its shapes fixed
ONNXMP_VARIANTS = ("onnxmp", "onnxmp-static")
PEERS = ("occ", "ort-transformers")
# Work order: what the targets need first (every model's FP32 and onnxmp rows), peers after, so
# that a run cut short by --deadline-s loses the least important rows.
PRIORITY = (("fp32", "onnxmp", "onnxmp-static"), ("ort-transformers", "occ", "fp32-static"))
BERT_SEQUENCE = 128
BUILDER_VERSION = 1  # bump when an export changes: files exported by another version are redone

# The FP16 issue's targets, checked at batch 32 (or the largest batch run) for the full models.
VIT_MIN_SPEEDUP = 2.5
VIT_MAX_REL_ERR = 5e-3
RESNET_MIN_SPEEDUP = 2.0
# The kernel-fusion issue's: the best onnxmp variant against FP32 at batch 32.
FUSED_MIN_SPEEDUP = {"resnet50": 2.5, "bert": 2.5, "vit": 3.2}
FP16_MAX_REL_ERR = 1e-2  # the fp16 preset's max_rel_l2_error gate
CUDA_GRAPH_MODELS = ("bert", "vit")  # their static variants must run with CUDA graph capture

# Dense (no sparsity) tensor-core peaks per GPU, TFLOP/s: (FP16/BF16, TF32), from NVIDIA's data
# sheets. Matched against nvidia-smi's name in this order; --peak-tflops overrides.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.5, 378.0),
    ("H100 NVL", 835.5, 417.5),
    ("H100", 989.4, 494.7),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.05, 183.0),
    ("L4", 121.0, 60.0),
)

# Wall-clock start of the whole run; workers inherit it, so every progress line shares one clock.
START = float(os.environ.get("GPU_FP16_START") or time.time())


def log(message: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {message}", flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0].strip()
    return line if len(line) <= 300 else line[:297] + "..."


# ================================================================================ model specs
@dataclass
class ModelSpec:
    name: str
    build: Callable[[Path], dict]  # writes the FP32 model to the path; returns what was built
    ort_type: str | None = None  # onnxruntime.transformers model_type; None: the variant is n/a
    num_heads: int = 0
    hidden_size: int = 0
    sequence: int | None = None  # value of every symbolic input dimension after the first
    vocab: int = 100  # token ids are drawn from [0, vocab)
    build_key: dict = field(default_factory=dict)  # a different key re-exports
    # The torch module and its inputs for a batch, for counting FLOPs; None: no roofline.
    module: Callable[[], tuple[Any, Callable[[int], tuple]]] | None = None


def _torch():
    import torch

    return torch


@contextlib.contextmanager
def _export_context():
    """Export-time settings: no MHA fast path (its fused op has no ONNX export), quiet tracer."""
    torch = _torch()
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None and hasattr(mha, "get_fastpath_enabled") else None
    if fast is not None:
        mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if fast is not None:
            mha.set_fastpath_enabled(fast)


def _export(module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    """torch.onnx.export (TorchScript exporter, opset 17) to a temporary file, then rename."""
    torch = _torch()
    module.eval()
    tmp = path.with_name(path.name + ".tmp")
    kwargs = dict(
        opset_version=17,
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=dynamic,
        do_constant_folding=True,
    )
    with _export_context():
        try:
            torch.onnx.export(module, args, str(tmp), dynamo=False, **kwargs)
        except TypeError as exc:  # a torch from before the dynamo argument
            if "dynamo" not in str(exc):
                raise
            torch.onnx.export(module, args, str(tmp), **kwargs)
    # Keep one self-contained file (all three models are far below 2 GB).
    proto = onnx.load(str(tmp))
    for leftover in tmp.parent.glob(tmp.name + "*"):
        leftover.unlink()
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)


def _image_dynamic(inp: str, out: str) -> dict:
    return {inp: {0: "batch"}, out: {0: "batch"}}


def _images(size: int) -> Callable[[int], tuple]:
    return lambda batch: (_torch().randn(batch, 3, size, size),)


def resnet50_module():
    import torchvision

    _torch().manual_seed(0)
    return torchvision.models.resnet50(weights=None), _images(224)


def vit_module():
    import torchvision

    torch = _torch()
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None)
    head = getattr(getattr(model, "heads", None), "head", None)
    if isinstance(head, torch.nn.Linear):
        head.reset_parameters()  # torchvision initializes the head to zeros: logits would all be 0
    return model, _images(224)


def build_resnet50(path: Path) -> dict:
    import torchvision

    model, inputs = resnet50_module()
    _export(model, inputs(2), path, ["input"], ["logits"], _image_dynamic("input", "logits"))
    return {"source": "torchvision.models.resnet50(weights=None)", "torchvision": torchvision.__version__}


def build_vit(path: Path) -> dict:
    import torchvision

    model, inputs = vit_module()
    _export(model, inputs(2), path, ["input"], ["logits"], _image_dynamic("input", "logits"))
    return {"source": "torchvision.models.vit_b_16(weights=None)", "torchvision": torchvision.__version__,
            "note": "classifier head re-initialized (torchvision zero-initializes it)"}


def _bert_config(attn: str, **sizes):
    import transformers

    if attn == "default":
        return transformers.BertConfig(**sizes), "default"
    try:
        config = transformers.BertConfig(attn_implementation=attn, **sizes)
    except TypeError:
        config = transformers.BertConfig(**sizes)
    try:
        config._attn_implementation = attn
    except Exception:  # noqa: BLE001 - older or newer transformers: keep what the config says
        pass
    return config, attn


def bert_module(attn: str, sequence: int, **sizes):
    """(wrapped BertModel, inputs for a batch, the BertModel, the attention implementation asked)."""
    import transformers

    torch = _torch()
    torch.manual_seed(0)
    config, asked = _bert_config(attn, **sizes)
    bert = transformers.BertModel(config)
    bert.eval()

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.bert = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    def inputs(batch: int) -> tuple:
        ids = torch.randint(0, config.vocab_size, (batch, sequence), dtype=torch.int64)
        return ids, torch.ones(batch, sequence, dtype=torch.int64), torch.zeros(batch, sequence, dtype=torch.int64)

    return Wrapper(bert), inputs, bert, asked


def _export_bert(path: Path, attn: str, sequence: int, **sizes) -> dict:
    import transformers

    wrapper, inputs, bert, asked = bert_module(attn, sequence, **sizes)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic["last_hidden_state"] = {0: "batch", 1: "sequence"}
    dynamic["pooler_output"] = {0: "batch"}
    _export(wrapper, inputs(2), path, names, ["last_hidden_state", "pooler_output"], dynamic)
    used = getattr(bert.config, "_attn_implementation", None)
    return {"source": f"transformers.BertModel(BertConfig({', '.join(f'{k}={v}' for k, v in sizes.items())}))",
            "transformers": transformers.__version__, "attn_implementation": used or asked}


def build_bert(attn: str, sequence: int) -> Callable[[Path], dict]:
    return lambda path: _export_bert(path, attn, sequence)


# ------------------------------------------------------------------------- tiny stand-ins
def _tiny_cnn_module():
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class TinyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.layers = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))

    return TinyCNN()


def tiny_cnn_module():
    _torch().manual_seed(0)
    return _tiny_cnn_module(), _images(32)


def tiny_vit_module():
    _torch().manual_seed(0)
    return _tiny_vit_module(), _images(32)


TINY_BERT_SIZES = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=128)


def build_tiny_cnn(path: Path) -> dict:
    model, inputs = tiny_cnn_module()
    _export(model, inputs(2), path, ["input"], ["logits"], _image_dynamic("input", "logits"))
    return {"source": "torch: ResNet-style CNN (3 basic blocks, 32x32 input)"}


def _tiny_vit_module(image=32, patch=8, hidden=64, heads=4, layers=2, mlp=128, classes=10):
    """torchvision's VisionTransformer in miniature: conv patches, class token, pre-LN blocks with
    nn.MultiheadAttention(batch_first=True), GELU MLP, final LayerNorm, head on the class token."""
    torch = _torch()
    nn = torch.nn

    class EncoderBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
            self.self_attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
            self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
            self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Linear(mlp, hidden))

        def forward(self, x):
            y = self.ln_1(x)
            y, _ = self.self_attention(y, y, y, need_weights=False)
            x = x + y
            return x + self.mlp(self.ln_2(x))

    class TinyViT(nn.Module):
        def __init__(self):
            super().__init__()
            tokens = (image // patch) ** 2 + 1
            self.conv_proj = nn.Conv2d(3, hidden, patch, patch)
            self.class_token = nn.Parameter(torch.zeros(1, 1, hidden))
            self.pos_embedding = nn.Parameter(torch.empty(1, tokens, hidden).normal_(std=0.02))
            self.layers = nn.Sequential(*[EncoderBlock() for _ in range(layers)])
            self.ln = nn.LayerNorm(hidden, eps=1e-6)
            self.head = nn.Linear(hidden, classes)

        def forward(self, x):
            n = x.shape[0]
            x = self.conv_proj(x).reshape(n, hidden, -1).permute(0, 2, 1)
            x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
            x = self.ln(self.layers(x))
            return self.head(x[:, 0])

    return TinyViT()


def build_tiny_vit(path: Path) -> dict:
    model, inputs = tiny_vit_module()
    _export(model, inputs(2), path, ["input"], ["logits"], _image_dynamic("input", "logits"))
    return {"source": "torch: ViT-style model (nn.MultiheadAttention, hidden 64, 4 heads, 2 layers, 32x32 input)"}


def build_tiny_bert(attn: str) -> Callable[[Path], dict]:
    return lambda path: _export_bert(path, attn, 32, **TINY_BERT_SIZES)


def copy_fixture(name: str) -> Callable[[Path], dict]:
    def build(path: Path) -> dict:
        src = ROOT / "fixtures" / "models" / name
        shutil.copyfile(src, path.with_name(path.name + ".tmp"))
        os.replace(path.with_name(path.name + ".tmp"), path)
        return {"source": f"fixtures/models/{name}"}

    return build


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def model_specs(names: list[str], args) -> list[ModelSpec]:
    attn = args.bert_attn
    have_torch = _available("torch") and args.tiny_source != "fixtures"
    have_hf = have_torch and _available("transformers")
    catalog = {
        "resnet50": lambda: ModelSpec("resnet50", build_resnet50, module=resnet50_module),
        "bert": lambda: ModelSpec("bert", build_bert(attn, args.sequence), "bert", 12, 768, args.sequence, 30522,
                                  {"attn": attn, "sequence": args.sequence},
                                  module=lambda: bert_module(attn, args.sequence)[:2]),
        "vit": lambda: ModelSpec("vit", build_vit, "vit", 12, 768, module=vit_module),
        "tiny-cnn": lambda: (ModelSpec("tiny-cnn", build_tiny_cnn, module=tiny_cnn_module) if have_torch
                             else ModelSpec("tiny-cnn", copy_fixture("cnn_bn_residual.onnx"), build_key={"fixture": 1})),
        "tiny-bert": lambda: (ModelSpec("tiny-bert", build_tiny_bert(attn), "bert", 4, 64, 32, 1000, {"attn": attn},
                                        module=lambda: bert_module(attn, 32, **TINY_BERT_SIZES)[:2])
                              if have_hf
                              else ModelSpec("tiny-bert", copy_fixture("transformer_block.onnx"), "bert", 4, 64,
                                             build_key={"fixture": 1})),
        "tiny-vit": lambda: (ModelSpec("tiny-vit", build_tiny_vit, "vit", 4, 64, module=tiny_vit_module) if have_torch
                             else ModelSpec("tiny-vit", copy_fixture("tiny_transformer.onnx"), "vit", 0, 0,
                                            build_key={"fixture": 1})),
    }
    specs = []
    for name in names:
        if name not in catalog:
            raise SystemExit(f"error: unknown model '{name}'; choose from {', '.join(catalog)} or 'tiny'")
        specs.append(catalog[name]())
    return specs


# ================================================================================ roofline
def count_flops(spec: ModelSpec, batches: list[int], device: str) -> dict[int, int]:
    """FLOPs of one forward pass per batch, counted by torch.utils.flop_counter.FlopCounterMode on
    ``device`` (matrix products and convolutions, 2 per multiply-add; elementwise work is not
    counted, so the percentages below are of the tensor-core roofline)."""
    torch = _torch()
    from torch.utils.flop_counter import FlopCounterMode

    module, inputs = spec.module()
    module = module.eval().to(device)
    flops = {}
    try:
        with torch.no_grad(), _export_context():
            for batch in batches:
                args = tuple(a.to(device) for a in inputs(batch))
                with FlopCounterMode(display=False) as counter:
                    module(*args)
                flops[batch] = int(counter.get_total_flops())
    finally:
        del module
        if device == "cuda":
            torch.cuda.empty_cache()
    return flops


def peak_tflops(gpu: str | None, override: list[float] | None) -> tuple[str, float, float] | None:
    """(label, FP16 peak, TF32 peak) in TFLOP/s for nvidia-smi's GPU name; None when unknown."""
    if override:
        return ("--peak-tflops", override[0], override[1])
    for name, fp16, tf32 in PEAK_TFLOPS:
        if gpu and name.lower() in gpu.lower():
            return (name, fp16, tf32)
    return None


def roofline(row: dict, flops: int | None, peak: tuple[str, float, float] | None) -> None:
    """Achieved TFLOP/s and the percentage of the peak that fits the row's arithmetic: FP16 for
    the FP16 variants; for FP32, TF32 when the CUDA provider's use_tf32 is on, else no peak."""
    median = _number(row.get("median_ms"))
    if not flops or not median:
        return
    row["tflops"] = flops / (median / 1000.0) / 1e12
    if peak is None:
        return
    if not row["variant"].startswith("fp32"):  # fp32 and fp32-static compute in float32 (TF32)
        row["peak"], value = "fp16", peak[1]
    elif row.get("tf32"):
        row["peak"], value = "tf32", peak[2]
    else:
        return
    row["pct_peak"] = 100.0 * row["tflops"] / value


# ================================================================================ model files
def graph_summary(path: Path) -> dict:
    """Op histogram, Cast count and the graph inputs (name, numpy dtype, dims) of a model file."""
    proto = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in iter_proto_nodes(proto.graph))
    inits = {t.name for t in proto.graph.initializer}
    inputs = []
    for info in proto.graph.input:
        if info.name in inits:
            continue
        tensor = info.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tensor.shape.dim]
        inputs.append((info.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), dims))
    return {"ops": dict(sorted(ops.items())), "casts": ops.get("Cast", 0), "nodes": sum(ops.values()), "inputs": inputs}


def bench_dims(inputs: list, spec: ModelSpec) -> dict[str, int]:
    """Values for the symbolic dimensions after the first axis (the sequence of a BERT export)."""
    dims = {}
    if spec.sequence is None:
        return dims
    for _, _, shape in inputs:
        for axis, dim in enumerate(shape):
            if axis > 0 and isinstance(dim, str) and dim:
                dims[dim] = spec.sequence
    return dims


def _int_kind(name: str) -> str:
    lower = name.lower()
    if "mask" in lower:
        return "ones"
    if "token_type" in lower or "segment" in lower:
        return "zeros"
    return "ids"


def make_feeds(inputs: list, spec: ModelSpec, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Realistic inputs: N(0, 1) floats; masks all ones, token types zeros, ids in [0, vocab)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dtype, shape in inputs:
        sizes = []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int) and dim > 0:
                sizes.append(dim)
            elif axis == 0:
                sizes.append(batch)
            else:
                sizes.append(spec.sequence or 1)
        dtype = np.dtype(dtype)
        if dtype.kind == "f":
            array = rng.standard_normal(sizes, dtype=np.float32).astype(dtype)
        elif dtype.kind == "b":
            array = np.ones(sizes, dtype=bool)
        else:
            kind = _int_kind(name)
            if kind == "ones":
                array = np.ones(sizes, dtype=dtype)
            elif kind == "zeros":
                array = np.zeros(sizes, dtype=dtype)
            else:
                array = rng.integers(0, spec.vocab, size=sizes).astype(dtype)
        feeds[name] = np.ascontiguousarray(array)
    return feeds


@contextlib.contextmanager
def realistic_bench_inputs():
    """Make onnxmp.runtime.benchmark's random integer inputs realistic: masks all ones and token
    types zeros (its ids are drawn from [0, 100), valid for any vocabulary of 100 or more).

    benchmark() draws token-id-like values in [0, 100) for every integer input; a BERT fed those
    as attention_mask and token_type_ids indexes past its 2-row token-type table (onnxruntime's CPU
    Gather refuses it; fused CUDA kernels may read out of bounds) and masks almost every token.
    """
    original = getattr(rt, "_random_inputs", None)
    if original is None:
        yield False
        return

    def patched(*args, **kwargs):
        made = original(*args, **kwargs)
        if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], list)):
            return made  # a changed onnxmp.runtime: leave its inputs alone
        inputs, effective = made
        for item in inputs:
            array = getattr(item, "array", None)
            if isinstance(array, np.ndarray) and array.dtype.kind in "iu":
                kind = _int_kind(item.name)
                if kind == "ones":
                    item.array = np.ones_like(array)
                elif kind == "zeros":
                    item.array = np.zeros_like(array)
        return inputs, effective

    rt._random_inputs = patched
    try:
        yield True
    finally:
        rt._random_inputs = original


# ================================================================================ conversions
def convert_onnxmp(src: Path, dst: Path, val_data: Path | None, mode: str) -> tuple[dict, str]:
    """onnxmp's fp16 preset; returns (info, note). A failed gate is noted, then the model is
    rebuilt without gates so that its speed can still be measured."""
    from onnxmp import api
    from onnxmp.errors import DataError, ValidationError
    from onnxmp.policy import preset_text

    report = dst.with_name(dst.stem + ".report.json")
    info: dict[str, Any] = {"call": 'onnxmp.api.optimize(src, dst, "fp16")', "validation_mode": mode}
    note = ""
    ungated = json.loads(preset_text("fp16"))
    ungated.pop("validation", None)
    if mode == "off":
        result = api.optimize(src, dst, ungated, report_path=report)
    else:
        options = {"validation_data": str(val_data)} if mode == "data" and val_data is not None else {}
        try:
            result = api.optimize(src, dst, "fp16", report_path=report, **options)
        except (ValidationError, DataError) as exc:
            text = str(exc).strip()
            info["validation_error"] = text
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 and "accuracy check" in lines[0] else lines[0] if lines else type(exc).__name__
            note = f"gate failed: {detail}" if isinstance(exc, ValidationError) else f"validation error: {detail}"
            log(f"  onnxmp validation failed ({type(exc).__name__}): {first_line(exc)}; rebuilding without gates")
            result = api.optimize(src, dst, ungated, report_path=report)
    rep = result.report
    validation = rep.get("validation")
    if validation is not None:
        info["validation"] = {
            "passed": validation.get("passed"),
            "outputs": {k: {m: v.get(m) for m in ("rel_l2_error", "cosine_similarity", "top1_agreement") if m in v}
                        for k, v in validation.get("outputs", {}).items()},
            "notes": validation.get("notes", []),
        }
    info["pipeline"] = rep.get("pipeline")
    info["casts"] = rep.get("casts")
    info["nodes"] = rep.get("nodes")
    info["pass_seconds"] = {f"{i}:{p['name']}": round(p.get("seconds", 0.0), 3) for i, p in enumerate(rep.get("passes", []))}
    decisions = [d for d in rep.get("decisions", []) if isinstance(d, dict)]
    info["precision_rules"] = dict(Counter(str(d.get("rule", "?")).split(":")[0] for d in decisions))
    info["float32_nodes"] = dict(Counter(
        f"{d.get('op')} ({str(d.get('rule', '?')).split(':')[0]})" for d in decisions if d.get("precision") == "float32"
    ))
    return info, note


def static_dims(inputs: list, spec: ModelSpec, batch: int) -> dict[str, int]:
    """The symbolic dimensions of the model's inputs fixed as the benchmark feeds them: the first
    axis to ``batch``, every later one to the model's sequence (see make_feeds)."""
    dims = {}
    for _, _, shape in inputs:
        for axis, dim in enumerate(shape):
            if isinstance(dim, str) and dim:
                dims.setdefault(dim, batch if axis == 0 else (spec.sequence or 1))
    return dims


def convert_onnxmp_static(src: Path, dst: Path, dims: dict[str, int], preset: str = "fp16") -> tuple[dict, str]:
    """``preset`` (fp16, or fp32 for the fp32-static variant) with specialize-shapes fixing ``dims``
    (what ``onnxmp optimize --policy PRESET --fix-dim NAME=VALUE ...`` runs), no validation gates:
    the benchmark measures accuracy itself."""
    from onnxmp import api
    from onnxmp.passes.specialize_shapes import specialized_passes
    from onnxmp.policy import preset_text

    policy = json.loads(preset_text(preset))
    policy.pop("validation", None)
    policy["passes"] = specialized_passes(policy["passes"], dims, {})
    result = api.optimize(src, dst, policy, report_path=dst.with_name(dst.stem + ".report.json"))
    rep = result.report
    fixed = " ".join(f"--fix-dim {k}={v}" for k, v in dims.items())
    return {"call": f"onnxmp optimize --policy {preset} {fixed} (no validation gates)", "pipeline": rep.get("pipeline"),
            "casts": rep.get("casts"), "nodes": rep.get("nodes"), "dims": dims}, ""


def convert_occ(src: Path, dst: Path) -> tuple[dict, str]:
    from onnxconverter_common import float16

    import onnxconverter_common

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one "will be truncated" warning per small weight
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(dst))
    return {"call": "onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True)",
            "version": onnxconverter_common.__version__}, ""


def convert_ort_transformers(src: Path, dst: Path, spec: ModelSpec, use_gpu: bool, opt_level: int | None) -> tuple[dict, str]:
    from onnxruntime.transformers.optimizer import optimize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = optimize_model(str(src), model_type=spec.ort_type, num_heads=spec.num_heads,
                                   hidden_size=spec.hidden_size, opt_level=opt_level, use_gpu=use_gpu)
        fused = {k: v for k, v in (optimizer.get_fused_operator_statistics() or {}).items() if v}
        optimizer.convert_float_to_float16(keep_io_types=True)
    optimizer.save_model_to_file(str(dst))
    call = (f"optimize_model(model_type={spec.ort_type!r}, num_heads={spec.num_heads}, hidden_size={spec.hidden_size}, "
            f"opt_level={opt_level}, use_gpu={use_gpu}).convert_float_to_float16(keep_io_types=True)")
    return {"call": call, "fused_operators": fused}, ""


# ================================================================================ measurement
def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """Relative L2 and max abs error of the first output; NaN/Inf in any candidate output."""
    nonfinite = any(not np.isfinite(np.asarray(c, dtype=np.float64)).all() for c in candidate if np.asarray(c).dtype.kind == "f")
    ref = np.asarray(reference[0], dtype=np.float64)
    out = np.asarray(candidate[0], dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"first output has shape {list(out.shape)}, FP32 has {list(ref.shape)}")
    diff = out - ref
    with np.errstate(all="ignore"):
        ref_norm = float(np.linalg.norm(ref))
        diff_norm = float(np.linalg.norm(diff))
        rel = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)
        max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    per_output = []
    for r, c in zip(reference, candidate):
        r64, c64 = np.asarray(r, dtype=np.float64), np.asarray(c, dtype=np.float64)
        if r64.shape != c64.shape:
            per_output.append(None)
            continue
        with np.errstate(all="ignore"):
            n = float(np.linalg.norm(r64))
            d = float(np.linalg.norm(c64 - r64))
        per_output.append(d / n if n > 0 else (0.0 if d == 0 else math.inf))
    return {"rel_err": rel, "max_abs_err": max_abs, "nan": bool(nonfinite), "rel_err_per_output": per_output,
            "ref_norm": ref_norm}


def run_outputs(path: Path, provider: str, feeds_by_batch: dict[int, dict], nhwc: bool | None,
                info: dict | None = None) -> dict[int, list[np.ndarray]]:
    """One session, every batch: {batch: outputs}. Feeds are cast to the model's input dtypes.
    ``info["tf32"]`` records whether the CUDA provider computes float32 MatMul/Conv in TF32
    (its ``use_tf32`` option, on by default), which decides the roofline of an FP32 row.

    Raises _LoadError when onnxruntime cannot create the session, _RunError when it cannot run it.
    """
    try:
        session = rt.make_session(str(path), provider, nhwc=nhwc)
    except Exception as exc:  # noqa: BLE001
        raise _LoadError(first_line(exc)) from exc
    if info is not None and provider == "cuda":
        with contextlib.suppress(Exception):
            info["tf32"] = session.get_provider_options()["CUDAExecutionProvider"].get("use_tf32") == "1"
    try:
        wanted = {}
        for spec in session.get_inputs():
            kind = spec.type[len("tensor("):-1] if spec.type.startswith("tensor(") else spec.type
            wanted[spec.name] = {"float": np.float32, "float16": np.float16, "double": np.float64}.get(kind, kind)
        results = {}
        for batch, feeds in feeds_by_batch.items():
            missing = sorted(set(wanted) - set(feeds))
            if missing:
                raise _RunError(f"model inputs {missing} are not inputs of the FP32 model")
            try:
                cast = {name: feeds[name].astype(np.dtype(wanted[name])) for name in wanted}
                results[batch] = [np.asarray(o) for o in session.run(None, cast)]
            except Exception as exc:  # noqa: BLE001
                raise _RunError(f"batch {batch}: {first_line(exc)}") from exc
        return results
    finally:
        with contextlib.suppress(UnboundLocalError, NameError):
            del session
        gc.collect()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _finite(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


# ================================================================================ the table
COLUMNS = ("model", "batch", "variant", "median ms", "vs fp32", "TFLOP/s", "% peak", "graph", "rel err", "max abs", "NaN",
           "casts", "status")


def _fmt_row(row: dict, status_width: int = 64) -> list[str]:
    def num(value, fmt):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, fmt)
        return "-" if value is None else str(value)  # "inf" from the JSON form

    status = row.get("status", "")
    if len(status) > status_width:
        status = status[: status_width - 3] + "..."
    nan = row.get("nan")
    return [
        row["model"],
        str(row["batch"]),
        row["variant"],
        num(row.get("median_ms"), ".3f"),
        _x(row.get("speedup")),
        num(row.get("tflops"), ".3g"),
        "-" if row.get("pct_peak") is None else f"{row['pct_peak']:.1f}% {row['peak']}",
        "-" if row.get("cuda_graph") is None else ("yes" if row["cuda_graph"] else "no"),
        num(row.get("rel_err"), ".2e"),
        num(row.get("max_abs_err"), ".2e"),
        "-" if nan is None else ("yes" if nan else "no"),
        "-" if row.get("casts") is None else str(row["casts"]),
        status,
    ]


def render_table(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [_fmt_row(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    right = {1, 3, 4, 5, 6, 8, 9, 11}

    def line(values):
        parts = [v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(c) for c in cells[1:]])


def check_targets(rows: list[dict], batches: list[int]) -> list[dict]:
    """The FP16 issue's targets, then the kernel-fusion issue's (fusion_targets), for the full
    models in this run, at batch 32 (or the largest batch)."""
    if not batches:
        return []
    batch = 32 if 32 in batches else max(batches)
    by = {(r["model"], r["batch"], r["variant"]): r for r in rows}
    checks = []

    def row(model, variant):
        return by.get((model, batch, variant))

    vit = row("vit", "onnxmp")
    if vit is not None:
        loads = vit.get("nan") is not None or vit.get("median_ms") is not None
        rel = _number(vit.get("rel_err"))
        ok = (loads and vit.get("nan") is False and rel is not None and rel <= VIT_MAX_REL_ERR
              and (_number(vit.get("speedup")) or 0) >= VIT_MIN_SPEEDUP)
        checks.append({"target": f"vit b{batch}: onnxmp loads, no NaN, rel err <= {VIT_MAX_REL_ERR:g}, >= {VIT_MIN_SPEEDUP}x fp32",
                       "passed": bool(ok),
                       "measured": f"loads={'yes' if loads else 'no'} nan={_yn(vit.get('nan'))} rel={_g(vit.get('rel_err'))} "
                                   f"speedup={_x(vit.get('speedup'))} status={vit.get('status')}"})
    resnet = row("resnet50", "onnxmp")
    if resnet is not None:
        ok = (_number(resnet.get("speedup")) or 0) >= RESNET_MIN_SPEEDUP and resnet.get("nan") is False
        checks.append({"target": f"resnet50 b{batch}: onnxmp >= {RESNET_MIN_SPEEDUP}x fp32 (and no NaN)", "passed": bool(ok),
                       "measured": f"speedup={_x(resnet.get('speedup'))} nan={_yn(resnet.get('nan'))} "
                                   f"rel={_g(resnet.get('rel_err'))} status={resnet.get('status')}"})
    bert, peer = row("bert", "onnxmp"), row("bert", "ort-transformers")
    if bert is not None and peer is not None:
        mine, theirs = _number(bert.get("median_ms")), _number(peer.get("median_ms"))
        ok = mine is not None and (theirs is None or mine <= theirs) and bert.get("nan") is False
        checks.append({"target": f"bert b{batch}: onnxmp at least as fast as ort-transformers (and no NaN)", "passed": bool(ok),
                       "measured": f"onnxmp {_ms(mine)} vs ort-transformers {_ms(theirs)} "
                                   f"(onnxmp {_x(bert.get('speedup'))}, ort-transformers {_x(peer.get('speedup'))} fp32)"})
    checks.extend(fusion_targets(by, batch, batches))
    return checks


def _fine(row: dict | None) -> bool:
    """A row that ran: timed, no NaN, no failure in its status."""
    return bool(row) and _number(row.get("median_ms")) is not None and row.get("nan") is False


def fusion_targets(by: dict, batch: int, batches: list[int]) -> list[dict]:
    """Batch ``batch``: the best onnxmp variant >= FUSED_MIN_SPEEDUP x FP32; batch 1: faster than
    every peer's FP16 model that ran; BERT and ViT static variants captured as CUDA graphs."""
    checks = []
    models = sorted({m for m, _, _ in by} & set(FULL_MODELS), key=FULL_MODELS.index)

    def best(model: str, b: int) -> dict | None:
        candidates = [by.get((model, b, v)) for v in ONNXMP_VARIANTS]
        candidates = [r for r in candidates if _fine(r) and (_number(r.get("rel_err")) or math.inf) <= FP16_MAX_REL_ERR]
        return min(candidates, key=lambda r: r["median_ms"]) if candidates else None

    for model in models:
        mine = best(model, batch)
        need = FUSED_MIN_SPEEDUP[model]
        speed = _number(mine.get("speedup")) if mine else None
        checks.append({"target": f"{model} b{batch}: best onnxmp variant >= {need}x fp32 (no NaN, rel err <= {FP16_MAX_REL_ERR:g})",
                       "passed": bool(speed is not None and speed >= need),
                       "measured": "no onnxmp row ran" if mine is None else
                                   f"{mine['variant']} {_x(speed)} (rel {_g(mine.get('rel_err'))}, "
                                   f"{_pct(mine)} of peak)"})
    if 1 in batches:
        for model in models:
            mine = best(model, 1)
            peers = [r for r in (by.get((model, 1, v)) for v in PEERS) if _fine(r)]
            fastest = min(peers, key=lambda r: r["median_ms"]) if peers else None
            ok = mine is not None and (fastest is None or mine["median_ms"] < fastest["median_ms"])
            theirs = "no peer ran" if fastest is None else f"{fastest['variant']} {_ms(fastest['median_ms'])}"
            checks.append({"target": f"{model} b1: faster than every peer's FP16 model", "passed": bool(ok),
                           "measured": f"onnxmp {'-' if mine is None else mine['variant'] + ' ' + _ms(mine['median_ms'])}"
                                       f" vs {theirs}"})
    for model in (m for m in CUDA_GRAPH_MODELS if m in models):
        rows = [by.get((model, b, "onnxmp-static")) for b in batches]
        captured = [r for r in rows if r and r.get("cuda_graph") and _fine(r)]
        notes = sorted({n for r in rows if r for n in r.get("session_notes") or []})
        checks.append({"target": f"{model}: static-shape variant runs with CUDA graph capture at every batch",
                       "passed": len(captured) == len(batches) and bool(batches),
                       "measured": f"captured at {len(captured)} of {len(batches)} batches"
                                   + (f"; {notes[0]}" if notes else "")})
    return checks


def _pct(row: dict) -> str:
    return "-" if row.get("pct_peak") is None else f"{row['pct_peak']:.1f}% {row['peak']}"


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _yn(value):
    return "-" if value is None else ("yes" if value else "no")


def _g(value):
    return "-" if _number(value) is None else f"{value:.2e}"


def _x(value):
    return "-" if _number(value) is None else f"{value:.2f}x"


def _ms(value):
    return "-" if _number(value) is None else f"{value:.3f} ms"


def same_handoff_lines(rows: list[dict]) -> list[str]:
    """onnxmp-static's speed over fp32-static's per model and batch: the part of the ratio that
    FP16 and the fusions give, with static shapes, NHWC, fused conv bias and CUDA graphs on both."""
    by = {(r["model"], r["batch"], r["variant"]): r for r in rows}
    lines = []
    for (model, batch, variant), row in by.items():
        base = by.get((model, batch, "fp32-static"))
        if variant != "onnxmp-static" or not _fine(row) or not _fine(base):
            continue
        lines.append(f"  {model} b{batch}: {base['median_ms'] / row['median_ms']:.2f}x "
                     f"({_ms(base['median_ms'])} -> {_ms(row['median_ms'])})")
    return lines


def cast_lines(results: dict) -> list[str]:
    lines = []
    for name, model in results["models"].items():
        variants = model.get("variants", {})
        parts = []
        for variant in VARIANTS:
            casts = variants.get(variant, {}).get("casts")
            if casts is not None:
                parts.append(f"{variant} {casts}")
        if parts:
            lines.append(f"  {name}: " + ", ".join(parts))
    return lines


# ================================================================================ the run
class Run:
    """The parent process: exports, then one worker process per model and variant.

    Every conversion, session and timing runs in a worker (``--worker JOB.json``), so that a crash
    inside onnxruntime or a converter (a segfault is a possible outcome for a malformed model)
    costs that variant's rows, with the phase it died in, and never the rest of the run.
    """

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).expanduser().resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "jobs").mkdir(exist_ok=True)
        self.env_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
        self.rows: list[dict] = []
        self.results: dict[str, Any] = {"meta": self._meta(), "models": {}, "rows": self.rows, "targets": []}
        self.deadline = START + args.deadline_s if args.deadline_s > 0 else math.inf
        self.fp32_ms: dict[tuple[str, int], float] = {}
        self.peak = peak_tflops(self.results["meta"].get("gpu"), args.peak_tflops)
        self.results["meta"]["peak_tflops"] = self.peak

    def _meta(self) -> dict:
        import onnxruntime as ort

        meta = {
            "argv": sys.argv,
            "provider": self.args.provider,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers(),
            "onnxmp": getattr(onnxmp, "__version__", None),
            "numpy": np.__version__,
            "warmup": self.args.warmup,
            "repeats": self.args.repeats,
            "batches": self.args.batch_list,
            "variants": self.args.variant_list,
            "nhwc": self.args.nhwc,
            "onnxmp_validation": self.args.onnxmp_validation,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for package in ("torch", "torchvision", "transformers", "onnxconverter_common"):
            try:
                module = __import__(package)
                meta[package] = getattr(module, "__version__", "?")
            except Exception:  # noqa: BLE001 - absent or broken: recorded as such
                meta[package] = None
        if self.args.provider != "cpu":
            try:
                gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20)
                meta["gpu"] = gpu.stdout.strip() or None
            except Exception as exc:  # noqa: BLE001
                meta["gpu"] = f"unknown ({first_line(exc)})"
        return meta

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.time() - START, 1)
        text = json.dumps(_finite(self.results), indent=2, default=str) + "\n"
        for folder in filter(None, (self.out, self.env_out)):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / "gpu_fp16.json.tmp"
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, folder / "gpu_fp16.json")
            except OSError as exc:
                log(f"could not write {folder / 'gpu_fp16.json'}: {first_line(exc)}")

    def remaining(self) -> float:
        return self.deadline - time.time()

    # ---------------------------------------------------------------------------- export
    def export(self, spec: ModelSpec) -> tuple[Path, dict]:
        path = self.out / f"{spec.name}.fp32.onnx"
        sidecar = self.out / f"{spec.name}.fp32.json"
        if path.is_file() and sidecar.is_file() and not self.args.reexport:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
            if info.get("build_key") == spec.build_key and info.get("builder") == BUILDER_VERSION:
                log(f"{spec.name}: reusing {path}")
                info["reused"] = True
                return path, info
        log(f"{spec.name}: exporting to {path}")
        start = time.time()
        info = spec.build(path)
        info["build_key"] = spec.build_key
        info["builder"] = BUILDER_VERSION
        info["export_s"] = round(time.time() - start, 2)
        sidecar.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        log(f"{spec.name}: exported in {info['export_s']:.1f}s ({path.stat().st_size / 1e6:.1f} MB)")
        info["reused"] = False
        return path, info

    # ---------------------------------------------------------------------------- one model
    def prepare(self, spec: ModelSpec) -> dict | None:
        """Export the FP32 model, count its FLOPs, write the validation data; None if it cannot be built."""
        args = self.args
        entry: dict[str, Any] = {"variants": {}}
        self.results["models"][spec.name] = entry
        if self.remaining() <= 5:
            return None
        try:
            fp32_path, entry["export"] = self.export(spec)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built is a row, not a crash
            status = f"export failed: {first_line(exc)}"
            log(f"{spec.name}: {status}")
            entry["export"] = {"error": traceback.format_exc()}
            entry["status"] = status
            return None
        entry["flops"] = self.flops(spec, fp32_path)
        summary = graph_summary(fp32_path)
        entry["inputs"] = [(n, np.dtype(d).name, s) for n, d, s in summary["inputs"]]
        reference = self.out / f"{spec.name}.reference.npz"
        with contextlib.suppress(FileNotFoundError):
            reference.unlink()  # written anew by this run's fp32 worker
        val_data = None
        if "onnxmp" in args.variant_list and args.onnxmp_validation == "data":
            val_data = self.out / f"{spec.name}.validation.npz"
            np.savez(val_data, **make_feeds(summary["inputs"], spec, 2, seed=12345))
        return {"fp32": fp32_path, "reference": reference, "validation_data": val_data}

    def flops(self, spec: ModelSpec, fp32_path: Path) -> dict[int, int]:
        """FLOPs per batch, kept in the export's sidecar so that a reused export is not counted again."""
        sidecar = self.out / f"{spec.name}.fp32.json"
        info = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
        known = {int(b): v for b, v in info.get("flops", {}).items()}
        missing = [b for b in self.args.batch_list if b not in known]
        if missing and spec.module is not None and self.remaining() > 30:
            import torch

            device = "cuda" if self.args.provider == "cuda" and torch.cuda.is_available() else "cpu"
            start = time.time()
            try:
                known.update(count_flops(spec, missing, device))
                log(f"{spec.name}: FLOPs counted on {device} in {time.time() - start:.1f}s: "
                    + ", ".join(f"b{b} {known[b] / 1e9:.1f} GFLOP" for b in missing))
            except Exception as exc:  # noqa: BLE001 - no roofline is better than no benchmark
                log(f"{spec.name}: FLOP count failed: {first_line(exc)}")
            info["flops"] = {str(b): v for b, v in sorted(known.items())}
            with contextlib.suppress(OSError):
                sidecar.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return {b: known[b] for b in self.args.batch_list if b in known}

    def run_job(self, spec: ModelSpec, variant: str, files: dict) -> None:
        """One model x variant in a worker; its rows, with speed-ups and the roofline."""
        args = self.args
        entry = self.results["models"][spec.name]
        if variant == "ort-transformers" and spec.ort_type is None:
            entry["variants"][variant] = {"status": "n/a"}
            for batch in args.batch_list:
                self.add_row(spec.name, batch, variant, {"status": "n/a"})
            return
        if self.remaining() <= 5:
            entry["variants"][variant] = {"status": "skipped: time budget"}
            for batch in args.batch_list:
                self.add_row(spec.name, batch, variant, {"status": "skipped: time budget (--deadline-s)"})
            return
        job = {"model": spec.name, "variant": variant, "fp32": str(files["fp32"]), "reference": str(files["reference"]),
               "validation_data": str(files["validation_data"]) if files["validation_data"] else None,
               "validation": args.onnxmp_validation}
        result = self.spawn(job)
        if (variant == "onnxmp" and result.get("crash") and result.get("phase") == "convert"
                and args.onnxmp_validation != "off" and self.remaining() > 30):
            # onnxmp's own validation runs onnxruntime on the candidate; build it without gates to
            # tell a crash of onnxmp from a model that crashes onnxruntime when loaded.
            log(f"{spec.name}: onnxmp crashed while converting ({result['crash']}); again without validation")
            first = result
            result = self.spawn(dict(job, validation="off"))
            result.setdefault("info", {})["first_attempt"] = {k: first.get(k) for k in ("crash", "phase", "stderr_tail")}
            result["note"] = f"crashed in onnxmp validation ({first['crash']})"
        entry["variants"][variant] = result.get("info", {})
        for batch in args.batch_list:
            row = dict(result.get("rows", {}).get(str(batch)) or {})
            status = [s for s in (row.get("status"),) if s and s != "ok"]
            if result.get("crash") and not row.get("complete"):
                status.insert(0, f"crashed ({result['crash']}) {PHASES.get(result.get('phase'), result.get('phase'))}")
            if result.get("note"):
                status.append(result["note"])
            row["status"] = "; ".join(dict.fromkeys(status)) or "ok"
            if variant == "fp32" and row.get("median_ms"):
                self.fp32_ms[(spec.name, batch)] = row["median_ms"]
            if row.get("median_ms") and self.fp32_ms.get((spec.name, batch)):
                row["speedup"] = self.fp32_ms[(spec.name, batch)] / row["median_ms"]
            row.pop("complete", None)
            row["variant"] = variant
            roofline(row, entry.get("flops", {}).get(batch), self.peak)
            self.add_row(spec.name, batch, variant, row)

    def spawn(self, job: dict) -> dict:
        """Run one worker; its result, with 'crash' set when it died or ran out of time."""
        job = dict(job, args=_jsonable_args(self.args), deadline=self.deadline)
        name = f"{job['model']}.{job['variant']}" + ("" if job["validation"] == self.args.onnxmp_validation else ".retry")
        job_path = self.out / "jobs" / f"{name}.job.json"
        result_path = self.out / "jobs" / f"{name}.result.json"
        job["result"] = str(result_path)
        job_path.write_text(json.dumps(job, indent=2), encoding="utf-8")
        with contextlib.suppress(FileNotFoundError):
            result_path.unlink()
        env = dict(os.environ, GPU_FP16_START=repr(START), PYTHONUNBUFFERED="1")
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)]
        timeout = max(30.0, self.remaining() + 45.0) if math.isfinite(self.remaining()) else None
        crash = None
        stderr_tail = ""
        try:
            proc = subprocess.run(command, env=env, stdout=None, stderr=subprocess.PIPE, text=True,
                                  errors="replace", timeout=timeout)
            stderr_tail = _tail(proc.stderr)
            if proc.returncode != 0:
                crash = _exit_reason(proc.returncode)
        except subprocess.TimeoutExpired as exc:
            crash = f"killed after {exc.timeout:.0f}s"
            stderr_tail = _tail(exc.stderr if isinstance(exc.stderr, str) else (exc.stderr or b"").decode("utf-8", "replace"))
        with contextlib.suppress(OSError):
            (self.out / "jobs" / f"{name}.stderr.txt").write_text(stderr_tail, encoding="utf-8")
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            result = {"phase": "start"}
        if crash:
            result["crash"] = crash
            result["stderr_tail"] = stderr_tail
            frames = _crash_frames(stderr_tail)
            result["frames"] = frames
            last = stderr_tail.strip().splitlines()[-1] if stderr_tail.strip() else "-"
            log(f"{job['model']}: {job['variant']} worker {crash} {PHASES.get(result.get('phase'), result.get('phase'))}"
                f" ({frames or last})")
        result.setdefault("info", {})
        if crash:
            result["info"]["crash"] = {"reason": crash, "phase": result.get("phase"), "frames": result.get("frames"),
                                       "stderr_tail": stderr_tail}
        return result

    def add_row(self, model: str, batch: int, variant: str, values: dict) -> None:
        row = {"model": model, "batch": batch, "variant": variant}
        row.update(values)
        self.rows.append(row)
        self.save()

    # ---------------------------------------------------------------------------- all
    def run(self) -> int:
        args = self.args
        import onnxruntime as ort

        log(f"onnxruntime {ort.__version__} {ort.get_available_providers()}; provider {args.provider}; "
            f"models {','.join(args.model_list)}; batches {args.batch_list}; variants {','.join(args.variant_list)}; "
            f"warmup {args.warmup}, repeats {args.repeats}; out {self.out}")
        if self.results["meta"].get("gpu"):
            log(f"gpu: {self.results['meta']['gpu']}")
        wanted = rt.PROVIDERS.get(args.provider, "")
        if wanted not in ort.get_available_providers():
            log(f"error: {wanted} is not available in this onnxruntime ({ort.__file__}); on the device, "
                "`source /tmp/chunks/install.sh` first (it puts onnxruntime-gpu first on PYTHONPATH)")
            return 2
        specs = model_specs(args.model_list, args)
        prepared = {}
        for spec in specs:
            files = self.prepare(spec)
            if files is None:
                status = self.results["models"][spec.name].get("status", "skipped: time budget (--deadline-s)")
                for variant in args.variant_list:
                    for batch in args.batch_list:
                        self.add_row(spec.name, batch, variant, {"status": status})
            else:
                prepared[spec.name] = files
        for group in PRIORITY:
            for spec in specs:
                for variant in (v for v in group if v in args.variant_list):
                    if spec.name not in prepared:
                        continue
                    try:
                        self.run_job(spec, variant, prepared[spec.name])
                    except Exception as exc:  # noqa: BLE001 - last line of defence: keep the other rows
                        log(f"{spec.name}: {variant}: unexpected error: {first_line(exc)}")
                        self.results["models"][spec.name].setdefault("errors", {})[variant] = traceback.format_exc()
                        done = {r["batch"] for r in self.rows if r["model"] == spec.name and r["variant"] == variant}
                        for batch in args.batch_list:
                            if batch not in done:
                                self.add_row(spec.name, batch, variant, {"status": f"benchmark error: {first_line(exc)}"})
                    gc.collect()
        order = {name: i for i, name in enumerate(args.model_list)}
        self.rows.sort(key=lambda r: (order.get(r["model"], 99), VARIANTS.index(r["variant"]), r["batch"]))
        self.results["targets"] = check_targets(self.rows, args.batch_list)
        self.save()
        text = self.report()
        print(text, flush=True)
        for folder in filter(None, (self.out, self.env_out)):
            with contextlib.suppress(OSError):
                (folder / "gpu_fp16.txt").write_text(text + "\n", encoding="utf-8")
        return 0

    def report(self) -> str:
        meta = self.results["meta"]
        lines = ["", f"== gpu_fp16: {meta.get('gpu') or platform.processor() or platform.machine()}; onnxruntime "
                     f"{meta['onnxruntime']} {self.args.provider}; warmup {self.args.warmup}, median of "
                     f"{self.args.repeats}; {meta['elapsed_s']:.0f}s in all =="]
        lines.append(render_table(self.rows))
        lines.append("vs fp32: FP32 median / variant median (same model, batch, run); rel err = ||c - o||_2 / ||o||_2, "
                     "max abs: first output vs FP32 on the same inputs; NaN: NaN/Inf in any output; casts: Cast nodes; "
                     "graph: the session captured a CUDA graph")
        lines.append(self.roofline_note())
        casts = cast_lines(self.results)
        if casts:
            lines.append("cast count per model:")
            lines.extend(casts)
        for name, model in self.results["models"].items():
            fused = model.get("variants", {}).get("ort-transformers", {}).get("fused_operators")
            if fused:
                lines.append(f"ort-transformers fusions, {name}: " + ", ".join(f"{k}={v}" for k, v in fused.items()))
        same = same_handoff_lines(self.rows)
        if same:
            lines.append("FP16 alone (onnxmp-static vs fp32-static: same shapes, same session hand-off):")
            lines.extend(same)
        if self.results["targets"]:
            lines.append("targets:")
            for check in self.results["targets"]:
                lines.append(f"  [{'PASS' if check['passed'] else 'FAIL'}] {check['target']}: {check['measured']}")
        where = [str(self.out / "gpu_fp16.json")] + ([str(self.env_out / "gpu_fp16.json")] if self.env_out else [])
        lines.append("numbers: " + ", ".join(where))
        return "\n".join(lines)


    def roofline_note(self) -> str:
        counted = {name: m.get("flops") for name, m in self.results["models"].items() if m.get("flops")}
        text = ("TFLOP/s: the model's FLOPs (torch.utils.flop_counter.FlopCounterMode on the device, at each batch: "
                "matrix products and convolutions) / median time; ")
        if self.peak is None:
            text += f"% peak: no peak known for this {'GPU' if self.args.provider == 'cuda' else 'provider'} (--peak-tflops)"
        else:
            text += (f"% peak: of {self.peak[0]}'s dense tensor-core peak, FP16 {self.peak[1]:g} TFLOP/s for FP16 rows, "
                     f"TF32 {self.peak[2]:g} for FP32 rows (onnxruntime's CUDA provider computes float32 MatMul/Conv "
                     "in TF32: use_tf32=1 is its default; an FP32 row whose session has it off gets no percentage)")
        if counted:
            text += "\nFLOPs: " + "; ".join(f"{n} " + ", ".join(f"b{b} {v / 1e9:.3g} G" for b, v in f.items())
                                           for n, f in counted.items())
        return text


PHASES = {
    "start": "at start",
    "convert": "while converting",
    "accuracy": "loading/running the model",
    "bench": "while timing",
    "done": "at exit",
}


def _tail(text: str | None, limit: int = 20000) -> str:
    text = text or ""
    return text[-limit:]


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _jsonable_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


# ================================================================================ the worker
class Worker:
    """One model and variant in its own process: convert, accuracy, timing; results to a file
    after every step, so the parent knows how far a crashed worker got."""

    def __init__(self, job: dict):
        self.job = job
        self.args = argparse.Namespace(**job["args"])
        self.spec = next(s for s in model_specs([job["model"]], self.args))
        self.variant = job["variant"]
        self.out = Path(self.args.out).expanduser().resolve()
        self.result: dict[str, Any] = {"phase": "start", "info": {}, "rows": {}}
        self.nhwc = {"auto": None, "on": True, "off": False}[self.args.nhwc]

    def save(self, phase: str | None = None) -> None:
        if phase is not None:
            self.result["phase"] = phase
        path = Path(self.job["result"])
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(_finite(self.result), indent=2, default=str), encoding="utf-8")
        os.replace(tmp, path)

    def out_of_time(self) -> bool:
        return time.time() > float(self.job["deadline"])

    def run(self) -> int:
        import onnxruntime as ort

        with contextlib.suppress(Exception):
            ort.set_default_logger_severity(3)  # no per-session warnings about CPU fallbacks
        if self.args.provider != "cpu" and hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        spec, variant, args, info = self.spec, self.variant, self.args, self.result["info"]
        batches = list(args.batch_list)
        fp32_path = Path(self.job["fp32"])
        fp32_summary = graph_summary(fp32_path)
        feeds = {batch: make_feeds(fp32_summary["inputs"], spec, batch, seed=batch) for batch in batches}
        # A static variant is one model per batch; every other variant is one model for all batches.
        units = [[batch] for batch in batches] if variant in STATIC_VARIANTS else [batches]
        for unit in units:
            self.save("convert")
            static_batch = unit[0] if variant in STATIC_VARIANTS else None
            path, note = self.convert(fp32_path, info, static_batch, fp32_summary["inputs"])
            if path is None:
                for batch in unit:
                    self.result["rows"][str(batch)] = {"status": note, "complete": True}
                self.save()
                continue
            self.measure(path, note, unit, {b: feeds[b] for b in unit}, info)
        self.save("done")
        return 0

    def measure(self, path: Path, note: str, batches: list[int], feeds: dict[int, dict], info: dict) -> None:
        """Accuracy against the FP32 reference, then timing, for ``batches`` of one model file."""
        spec, variant, args = self.spec, self.variant, self.args
        summary = graph_summary(path)
        info.update(casts=summary["casts"], nodes=summary["nodes"], ops=summary["ops"], path=str(path))
        fused = info.get("fused_operators")
        log(f"{spec.name}: {variant} ready" + (f" in {info['convert_s']:.1f}s" if "convert_s" in info else "")
            + f" ({summary['nodes']} nodes, {summary['casts']} casts)"
            + (" fused " + ", ".join(f"{k}={v}" for k, v in fused.items()) if fused else "")
            + (f"; {note}" if note else ""))
        rows = self.result["rows"]
        for b in batches:
            rows[str(b)] = {"casts": summary["casts"], "convert_s": info.get("convert_s")}

        # ---- accuracy: one session for every batch, the same inputs as FP32
        self.save("accuracy")
        outputs, load_error = None, None
        try:
            outputs = run_outputs(path, args.provider, feeds, self.nhwc, info)
        except Exception as exc:  # noqa: BLE001
            load_error = exc
            info["accuracy_error"] = traceback.format_exc(limit=4)
            log(f"{spec.name}: {variant}: {_strip_prefix(first_line(exc))}")
        reference = None
        ref_path = Path(self.job["reference"])
        if outputs is not None and variant == "fp32":
            np.savez(ref_path, **{f"b{b}_o{i}": o for b, outs in outputs.items() for i, o in enumerate(outs)})
        if outputs is not None and ref_path.is_file():
            with np.load(ref_path) as data:
                reference = {b: [data[k] for k in sorted((k for k in data.files if k.startswith(f"b{b}_o")),
                                                         key=lambda k: int(k.split("_o")[1]))] for b in batches}
        for batch in batches:
            row = rows[str(batch)]
            if load_error is not None:
                kind = "run failed" if isinstance(load_error, _RunError) else "load failed"
                row["status"] = f"{kind}: {_strip_prefix(first_line(load_error))}"
            elif reference is None:
                row["status"] = "no FP32 reference"
            else:
                try:
                    row.update(compare(reference[batch], outputs[batch]))
                except Exception as exc:  # noqa: BLE001
                    row["status"] = f"compare failed: {first_line(exc)}"
        del outputs
        gc.collect()

        # ---- timing; a static variant's session captures a CUDA graph when the model allows it
        dims = bench_dims(summary["inputs"], spec)
        info["bench_dims"] = dims
        cuda_graph = None if variant in STATIC_VARIANTS and args.provider == "cuda" else False
        # The baseline runs as onnxruntime runs a model by default; every other variant gets the
        # hand-off of onnxmp.runtime (--nhwc; fused conv bias follows it).
        layout = {"nhwc": False, "fuse_conv_bias": False} if variant == "fp32" else {"nhwc": self.nhwc}
        for batch in batches:
            row = rows[str(batch)]
            if isinstance(load_error, _LoadError):
                row["complete"] = True
                continue
            if self.out_of_time():
                row["status"] = "; ".join(filter(None, (row.get("status"), "timing skipped: time budget")))
                row["complete"] = True
                continue
            self.save("bench")
            try:
                with realistic_bench_inputs() as patched:
                    row["bench_realistic_ints"] = patched
                    bench = rt.benchmark(str(path), args.provider, batch=batch, warmup=args.warmup,
                                         repeats=args.repeats, dims=dims or None, cuda_graph=cuda_graph, **layout)
                row.update(median_ms=bench.median_ms, p90_ms=bench.p90_ms, min_ms=bench.min_ms,
                           throughput=bench.throughput, session_providers=bench.providers,
                           provider_options=bench.provider_options, bench_inputs=bench.inputs,
                           cuda_graph=bench.cuda_graph, session_notes=bench.notes)
            except Exception as exc:  # noqa: BLE001
                row["bench_error"] = first_line(exc)
                if not row.get("status"):
                    row["status"] = f"timing failed: {_strip_prefix(first_line(exc))}"
            if note:
                row["status"] = "; ".join(filter(None, (row.get("status"), note)))
            row["tf32"] = info.get("tf32")
            row["complete"] = True
            log(f"{spec.name} b{batch} {variant}: {_ms(row.get('median_ms'))}, rel err {_g(row.get('rel_err'))}, "
                f"NaN {_yn(row.get('nan'))}" + (", CUDA graph" if row.get("cuda_graph") else "")
                + (f" [{row['status']}]" if row.get("status") else ""))
            self.save()
            gc.collect()

    def convert(self, fp32_path: Path, info: dict, batch: int | None, inputs: list) -> tuple[Path | None, str]:
        """(model path, note); (None, status) when the variant could not be built. ``batch`` is
        the batch a static variant is specialized to."""
        spec, variant, args = self.spec, self.variant, self.args
        if variant == "fp32":
            return fp32_path, ""
        path = self.out / f"{spec.name}.{variant}{'' if batch is None else f'.b{batch}'}.onnx"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # never measure a stale conversion
        start = time.time()
        try:
            if variant == "onnxmp":
                val = Path(self.job["validation_data"]) if self.job.get("validation_data") else None
                converted, note = convert_onnxmp(fp32_path, path, val, self.job["validation"])
            elif variant == "onnxmp-static":
                converted, note = convert_onnxmp_static(fp32_path, path, static_dims(inputs, spec, batch))
            elif variant == "fp32-static":
                converted, note = convert_onnxmp_static(fp32_path, path, static_dims(inputs, spec, batch), "fp32")
            elif variant == "occ":
                converted, note = convert_occ(fp32_path, path)
            elif variant == "ort-transformers":
                converted, note = convert_ort_transformers(fp32_path, path, spec, args.provider != "cpu", args.ort_opt_level)
            else:
                raise ValueError(f"unknown variant {variant}")
        except ImportError as exc:
            info["error"] = traceback.format_exc(limit=4)
            log(f"{spec.name}: {variant}: skipped: {first_line(exc)}")
            return None, f"skipped: {first_line(exc)}"
        except Exception as exc:  # noqa: BLE001 - each variant fails on its own
            info["error"] = traceback.format_exc(limit=8)
            log(f"{spec.name}: {variant}: convert failed: {first_line(exc)}")
            return None, f"convert failed: {first_line(exc)}"
        info.update(converted)
        info["convert_s"] = round(time.time() - start, 2)
        return path, note


class _LoadError(Exception):
    """onnxruntime could not create a session for the model."""


class _RunError(Exception):
    """The session was created but failed to run."""


def worker_main(job_path: str) -> int:
    import faulthandler

    faulthandler.enable()  # a segfault leaves the Python stack on stderr, which the parent keeps
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    return Worker(job).run()


def _strip_prefix(text: str) -> str:
    """The cause of an onnxruntime error, without the wrappers: onnxmp's "onnxruntime could not
    create a cuda session for 'X': ", "[ONNXRuntimeError] : 1 : FAIL : ", "Load model from P failed:"."""
    marker = "session for '"
    if marker in text:
        rest = text.split(marker, 1)[1]
        if "': " in rest:
            text = rest.split("': ", 1)[1]
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from \S+ failed:\s*", "", text)
    return text.strip()


def _crash_frames(stderr: str, count: int = 3) -> str:
    """The innermost Python frames of a faulthandler dump: 'file.py:123 in func <- ...'."""
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', stderr.split("most recent call first", 1)[-1])
    return " <- ".join(f"{Path(f).name}:{line} in {func}" for f, line, func in frames[:count])


# ================================================================================ arguments
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_pair(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers FP16,TF32, got {text!r}") from None
    if len(values) != 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected two positive numbers FP16,TF32, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="folder for the exported models, variants and gpu_fp16.json")
    parser.add_argument("--models", default=",".join(FULL_MODELS),
                        help="comma-separated: resnet50, bert, vit, tiny (= tiny-cnn,tiny-bert,tiny-vit) or tiny-*")
    parser.add_argument("--batches", type=_int_list, default=[1, 32], help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--provider", default="cuda", choices=["cuda", "cpu"], help="onnxruntime provider (default cuda)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before timing")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--sequence", type=int, default=BERT_SEQUENCE, help="BERT sequence length (default 128)")
    parser.add_argument("--bert-attn", default="eager", choices=["eager", "sdpa", "default"],
                        help="transformers attention implementation for the BERT export (default eager: the form "
                             "onnxruntime's transformer optimizer fuses)")
    parser.add_argument("--nhwc", default="auto", choices=["auto", "on", "off"],
                        help="CUDA prefer_nhwc for every variant but the fp32 baseline, which runs with onnxruntime's "
                             "defaults (auto: onnxmp.runtime's conv-heavy heuristic; fused conv bias follows it)")
    parser.add_argument("--ort-opt-level", type=int, default=None, choices=[0, 1, 2, 99],
                        help="opt_level for onnxruntime's transformer optimizer (default: its model-type default, 1)")
    parser.add_argument("--onnxmp-validation", default="data", choices=["data", "random", "off"],
                        help="onnxmp's fp16 gates: on the benchmark's realistic inputs (data), on onnxmp's own random "
                             "inputs (random), or none (off)")
    parser.add_argument("--tiny-source", default="auto", choices=["auto", "fixtures"],
                        help="tiny stand-ins: built with torch/transformers when importable (auto) or the fixtures")
    parser.add_argument("--reexport", action="store_true", help="export the FP32 models again even if present")
    parser.add_argument("--peak-tflops", type=_float_pair, default=None, metavar="FP16,TF32",
                        help="the GPU's dense tensor-core peaks in TFLOP/s (default: from the GPU's name, see PEAK_TFLOPS)")
    parser.add_argument("--deadline-s", type=float, default=480.0,
                        help="after this many seconds skip remaining work and print the table (0: no limit)")
    args = parser.parse_args(argv)
    models = []
    for name in (m.strip() for m in args.models.split(",") if m.strip()):
        models.extend(TINY_MODELS if name == "tiny" else [name])
    args.model_list = list(dict.fromkeys(models))
    args.batch_list = list(dict.fromkeys(args.batches))
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variant_list) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if "fp32" not in args.variant_list:
        args.variant_list.insert(0, "fp32")  # every ratio and error is against it
    args.variant_list.sort(key=VARIANTS.index)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    with contextlib.suppress(Exception):
        sys.stdout.reconfigure(line_buffering=True)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return worker_main(argv[1])
    args = parse_args(argv)
    return Run(args).run()


if __name__ == "__main__":
    sys.exit(main())
