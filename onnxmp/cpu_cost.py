"""A deterministic latency estimate of a model on onnxruntime's CPU provider, float or QDQ.

qdq-insertion's ``cost_model`` compares the estimate of the float model with that of its QDQ
form and keeps INT8 only where it is estimated faster: unlike timing, the answer is the same on
every run and every machine, so the output model is too.

The estimate walks the graph as onnxruntime's CPU provider runs it after its QDQ fusion:

* a ``Conv``/``MatMul``/``Gemm`` costs its multiply-accumulates (MACs) at the float rate, or,
  when it reads a ``DequantizeLinear`` (onnxruntime fuses it into QLinearConv, QLinearMatMul,
  MatMulIntegerToFloat or QGemm), a fixed ``INTEGER_NODE_NS``, its MACs at the integer rate,
  ``OUTPUT_NS`` per output element (requantizing) and, for a Conv that is not a plain 1x1,
  ``IM2COL_NS`` per element of its im2col buffer (what makes a narrow integer kernel slow: the
  buffer is the MACs over the output channels). A kernel with few products per output or few
  outputs gains little or loses: ``integer_pays`` says whether it gains at all. Chains of
  convolutions on onnxruntime 1.32 (2 shared cores, per convolution, noisy): 1x1 with 16 channels
  0.85x in INT8, 3x3 with 16 channels 1.0-1.7x, 32 channels 2.4x, 128 channels 3.1x; the
  estimate gives 1.0x, 1.5x, 2.0x, 2.9x (a step at 64 channels, before, said 16 and 32 channels
  gain nothing, and cnn_bn_residual, measured 1.10x in INT8, was estimated 0.99x);
* every other node costs its output elements at the element-wise rate;
* a ``DequantizeLinear`` of a constant (stored weights) is free (folded into the kernel);
* a ``QuantizeLinear`` after a node that reads a ``DequantizeLinear`` (possibly through an
  absorbed Relu/Clip) is free (the integer kernel writes 8 bits); any other one (a region entry)
  costs its elements at the conversion rate; an activation ``DequantizeLinear`` costs the same
  unless every reader is such a fused node (a region exit); at a 4-D region entry or exit the
  same again for the layout Transpose that onnxruntime's NHWC integer kernels add there;
* every node that remains costs a fixed dispatch overhead.

Symbolic dimensions count as 1 (batch 1, as the ``measure`` step times it). The rates are those
of onnxruntime 1.31.1 on 2 AVX-512 VNNI cores at batch 1: the MAC rates fitted to the
ResNet-18/50-like graphs of ``benchmarks/int8_cpu.py`` (FP32 35.6/76.5 ms, INT8 10.7/23.6 ms),
the output and im2col rates to the chains above (their INT8 time less their MACs at the
integer rate, scaled as the MAC rates are), the fixed integer cost to the fixtures' profiles
(QLinearConv/QGemm against Conv/Gemm on 8x8 digits), the node overhead to the digits CNN (17 us for 11 nodes), the element rates from single
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
OUTPUT_NS = 0.2  # an integer Conv/GEMM, per output element (requantization)
IM2COL_NS = 0.09  # an integer Conv with a spatial kernel or stride, per element of its im2col buffer
INTEGER_NODE_NS = 2000.0  # fixed cost of an integer Conv/GEMM beyond NODE_NS (quantization parameters, packing)
NODE_NS = 760.0  # dispatch overhead of one node
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
            if len(node.inputs[0].shape or []) == 4:  # onnxruntime's NHWC integer kernels: a layout Transpose here too
                nodes += 1
                nanoseconds += NODE_NS + count * CONVERT_NS
        elif node.op in ANCHORS:
            macs = _macs(node)
            if _integer(node):
                int8_macs += macs
                nanoseconds += _integer_ns(node)
            else:
                float_macs += macs
                nanoseconds += macs * FLOAT_MAC_NS
        else:
            nanoseconds += sum(_elements(t) for t in node.outputs if not is_omitted(t)) * ELEMENT_NS
    return CostEstimate(nanoseconds / 1e6, float_macs, int8_macs, converted, nodes)


def integer_pays(node: gs.Node) -> bool:
    """Whether anchor ``node`` (Conv, MatMul or Gemm, shapes inferred) is estimated faster as an
    integer kernel than in float, its own Q/DQ aside: placement keeps the others float, so that a
    narrow layer (an RGB stem, a 1x1 of 16 channels, a 10-class head) does not cost the rest."""
    return _integer_ns(node) < _macs(node) * FLOAT_MAC_NS


def _integer_ns(node: gs.Node) -> float:
    """An integer kernel's MACs, its requantized outputs and, for a Conv that is not a plain 1x1,
    its im2col buffer (output pixels x products per output: MACs over output channels)."""
    macs, out = _macs(node), _elements(node.outputs[0])
    nanoseconds = INTEGER_NODE_NS + macs * INT8_MAC_NS + out * OUTPUT_NS
    if node.op == "Conv" and _spatial(node):
        channels = max(int(node.inputs[1].shape[0]) if node.inputs[1].shape else 1, 1)
        nanoseconds += macs / channels * IM2COL_NS
    return nanoseconds


def _spatial(node: gs.Node) -> bool:
    """Whether a Conv gathers more than one input pixel per output (a kernel wider than 1x1 or a stride)."""
    shape = node.inputs[1].shape or []
    return any(d != 1 for d in shape[2:]) or any(s != 1 for s in node.attrs.get("strides", []))


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


def _macs(node: gs.Node) -> int:
    """Multiply-accumulates of a Conv, MatMul or Gemm: output elements times products per output
    (from the weight shape; unknown dimensions count as 1)."""
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in (node.inputs[1].shape or [1])]
    if node.op == "Conv":
        depth = int(np.prod(shape[1:], dtype=np.int64))
    elif node.op == "Gemm":
        depth = shape[1] if node.attrs.get("transB", 0) else shape[0]
    else:
        depth = shape[-2] if len(shape) >= 2 else shape[0]
    return _elements(node.outputs[0]) * depth
