"""A deterministic latency estimate of a model on onnxruntime's CPU provider, float or QDQ.

qdq-insertion's ``cost_model`` compares the estimate of the float model with that of its QDQ
form and keeps INT8 only where it is estimated faster: unlike timing, the answer is the same on
every run and every machine, so the output model is too.

The estimate walks the graph as onnxruntime's CPU provider runs it after its QDQ fusion:

* a ``Conv``/``MatMul``/``Gemm`` costs its multiply-accumulates (MACs) at the float rate, or at
  the integer rate when it reads a ``DequantizeLinear`` (onnxruntime fuses it into QLinearConv,
  QLinearMatMul, MatMulIntegerToFloat or QGemm) and is wide enough for the integer kernels to
  gain: at least ``WIDE`` output channels and ``WIDE`` products per output (a narrow integer
  GEMM spends its time packing and requantizing: the 16-channel convolutions of the fixture CNNs
  ran 1.02-1.06x faster in INT8, 64-channel and wider ones 3x);
* every other node costs its output elements at the element-wise rate;
* a ``DequantizeLinear`` of a constant (stored weights) is free (folded into the kernel);
* a ``QuantizeLinear`` after a node that reads a ``DequantizeLinear`` (possibly through an
  absorbed Relu/Clip) is free (the integer kernel writes 8 bits); any other one (a region entry)
  costs its elements at the conversion rate; an activation ``DequantizeLinear`` costs the same
  unless every reader is such a fused node (a region exit);
* every node that remains costs a fixed dispatch overhead.

Symbolic dimensions count as 1 (batch 1, as the ``measure`` step times it). The rates are those
of onnxruntime 1.31.1 on 2 AVX-512 VNNI cores at batch 1: the MAC rates fitted to the
ResNet-18/50-like graphs of ``benchmarks/int8_cpu.py`` (FP32 35.6/76.5 ms, INT8 10.7/23.6 ms),
the node overhead to the digits CNN (17 us for 11 nodes), the element rates from single
element-wise and Q/DQ nodes on 200k elements. An estimate is not a timing: where it is close to
``min_speedup``, timing (``measure``) decides better.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxmp.ir import constant_value, is_omitted

FLOAT_MAC_NS = 0.019  # fp32 Conv/GEMM, per multiply-accumulate
INT8_MAC_NS = 0.0058  # u8s8 QLinearConv / QGemm, per multiply-accumulate
ELEMENT_NS = 0.06  # an element-wise op, per output element
CONVERT_NS = 0.14  # a standalone QuantizeLinear or DequantizeLinear, per element
NODE_NS = 760.0  # dispatch overhead of one node
WIDE = 64  # output channels and products per output an integer kernel needs to gain
ANCHORS = ("Conv", "MatMul", "Gemm")
ABSORBED = ("Relu", "Clip")


@dataclass
class CostEstimate:
    """Estimated latency at batch 1 and what it is made of."""

    ms: float
    float_macs: int
    int8_macs: int
    converted_elements: int
    nodes: int

    def report(self) -> dict[str, float | int]:
        return {"ms": round(self.ms, 4), "float_macs": self.float_macs, "int8_macs": self.int8_macs,
                "converted_elements": self.converted_elements, "nodes": self.nodes}  # fmt: skip


def estimate(graph: gs.Graph) -> CostEstimate:
    """The estimated latency of ``graph`` (shapes inferred) on the CPU provider."""
    float_macs = int8_macs = converted = nodes = 0
    nanoseconds = 0.0
    for node in graph.nodes:
        if node.op == "DequantizeLinear" and constant_value(node.inputs[0]) is not None:
            continue
        if node.op == "QuantizeLinear" and _fused_producer(node):
            continue
        if node.op == "DequantizeLinear" and node.outputs[0].outputs and all(_integer(u) for u in node.outputs[0].outputs):
            continue
        nodes += 1
        nanoseconds += NODE_NS
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            count = _elements(node.inputs[0])
            converted += count
            nanoseconds += count * CONVERT_NS
        elif node.op in ANCHORS:
            macs, channels, depth = _gemm_shape(node)
            if _integer(node) and channels >= WIDE and depth >= WIDE:
                int8_macs += macs
                nanoseconds += macs * INT8_MAC_NS
            else:
                float_macs += macs
                nanoseconds += macs * FLOAT_MAC_NS
        else:
            nanoseconds += sum(_elements(t) for t in node.outputs if not is_omitted(t)) * ELEMENT_NS
    return CostEstimate(nanoseconds / 1e6, float_macs, int8_macs, converted, nodes)


def _integer(node: gs.Node) -> bool:
    """Whether onnxruntime runs ``node`` as an integer kernel: it reads a DequantizeLinear."""
    return node.op not in ("QuantizeLinear", "DequantizeLinear") and any(
        t.inputs and t.inputs[0].op == "DequantizeLinear" for t in node.inputs if not is_omitted(t)
    )


def _fused_producer(node: gs.Node) -> bool:
    tensor = node.inputs[0]
    if not tensor.inputs:
        return False
    producer = tensor.inputs[0]
    if producer.op in ABSORBED and producer.inputs[0].inputs:
        producer = producer.inputs[0].inputs[0]
    return _integer(producer)


def _elements(tensor: gs.Tensor) -> int:
    shape = tensor.shape
    if shape is None:
        return 1
    return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in shape], dtype=np.int64))


def _gemm_shape(node: gs.Node) -> tuple[int, int, int]:
    """(MACs, output channels, products per output) of a Conv, MatMul or Gemm from its output
    and weight shapes; unknown weight dimensions count as 1."""
    out = _elements(node.outputs[0])
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in (node.inputs[1].shape or [1])]
    if node.op == "Conv":
        channels, depth = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    elif node.op == "Gemm":
        transposed = node.attrs.get("transB", 0)
        channels, depth = (shape[0], shape[1]) if transposed else (shape[-1], shape[0])
    else:
        channels, depth = shape[-1], shape[-2] if len(shape) >= 2 else shape[0]
    return out * depth, channels, depth
