"""specialize-shapes: fix the model's input shapes and fold away the shape computations they decide.

A PyTorch export computes its reshape targets at run time (Shape -> Gather -> Unsqueeze ->
Concat -> Reshape) because its batch and sequence are symbolic. onnxruntime runs those small
integer computations on the CPU, so a CUDA session copies between devices mid-graph and refuses
CUDA graph capture. Once every input dimension is fixed, Shape and Size have constant results
and so has all the arithmetic on them: this pass sets the graph inputs' (and outputs')
dimensions, re-infers the shapes, and folds with ``fold-constants`` until nothing more folds.

Dimensions come from ``dims`` (a symbolic dimension by name, on every input that has it) and
``shapes`` (one input's whole shape). A value that contradicts a fixed dimension of the model, an
unknown input or dimension name, or two values for one dimension are errors naming the option.
With neither option the pass specializes to the shapes the model already fixes.

Guarantee: for inputs of the fixed shapes the outputs are exactly the original's (the folded
values are what onnxruntime computes on the same nodes); the model accepts no other shapes.
Shape and Size nodes that remain (their input's shape is still not static) are recorded in the
report's decisions.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import onnx_graphsurgeon as gs

from onnxmp.errors import PolicyError
from onnxmp.ir import Model, graph_output_ids, static_shape
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.passes.constant_folding import FoldConstants, FoldConstantsOptions
from onnxmp.shapes import infer_shapes

NAME = "specialize-shapes"
MAX_ROUNDS = 16  # infer + fold rounds; each round resolves at least one more level of shape arithmetic
_DIM = re.compile(r"^\s*([^=\s][^=]*?)\s*=\s*(\d+)\s*$")
_SHAPE = re.compile(r"^\s*([^=\s][^=]*?)\s*=\s*(\d+(?:\s*x\s*\d+)*)?\s*$")


@dataclass
class SpecializeShapesOptions:
    dims: list[str] = field(
        default_factory=list,
        metadata={"help": "symbolic dimension values as NAME=VALUE, e.g. batch=32 (every input with that dimension)"},
    )
    shapes: list[str] = field(
        default_factory=list,
        metadata={"help": "whole input shapes as INPUT=D0xD1x..., e.g. input_ids=32x128 (INPUT= for a scalar)"},
    )
    max_output_elements: int = field(
        default=1 << 20,
        metadata={"help": "largest folded result (elements) allowed to exceed its inputs' size", "minimum": 0},
    )


def parse_dims(items: list[str], option: str = "dims") -> dict[str, int]:
    """``["batch=32", "sequence=128"]`` -> ``{"batch": 32, "sequence": 128}``; PolicyError on bad text."""
    values: dict[str, int] = {}
    for item in items:
        match = _DIM.match(item)
        if match is None or int(match.group(2)) < 1:
            raise PolicyError(f"{option}: '{item}' is not NAME=VALUE with a positive integer VALUE (e.g. batch=32)")
        name, value = match.group(1), int(match.group(2))
        if values.get(name, value) != value:
            raise PolicyError(f"{option}: dimension '{name}' is given twice, as {values[name]} and {value}")
        values[name] = value
    return values


def parse_shapes(items: list[str], option: str = "shapes") -> dict[str, list[int]]:
    """``["x=2x3x224x224"]`` -> ``{"x": [2, 3, 224, 224]}``; PolicyError on bad text."""
    shapes: dict[str, list[int]] = {}
    for item in items:
        match = _SHAPE.match(item)
        dims = [int(d) for d in re.split(r"\s*x\s*", match.group(2))] if match and match.group(2) else []
        if match is None or any(d < 1 for d in dims):
            raise PolicyError(f"{option}: '{item}' is not INPUT=D0xD1x... with positive integers (e.g. input_ids=32x128)")
        name = match.group(1)
        if shapes.get(name, dims) != dims:
            raise PolicyError(f"{option}: input '{name}' is given two shapes, {shapes[name]} and {dims}")
        shapes[name] = dims
    return shapes


@register
class SpecializeShapes(Pass):
    """Fix input dimensions (policy values) and fold the shape computations to constants."""

    name = NAME
    preserves_fp32 = True
    Options = SpecializeShapesOptions

    def __init__(self, options: SpecializeShapesOptions | None = None):
        super().__init__(options)
        self.dims = parse_dims(self.options.dims)
        self.shapes = parse_shapes(self.options.shapes)

    def run(self, model: Model, ctx: PassContext) -> bool:
        inputs = [t for t in model.graph.inputs if isinstance(t, gs.Variable)]
        fixed = _resolve(inputs, self.dims, self.shapes)
        changed = _apply(model.graph, fixed, self.dims)
        if changed:
            model.shapes_current = False
        for name, shape in fixed.items():
            ctx.record(node=name, op="input", shape=shape, rule=NAME)
        folder = FoldConstants(FoldConstantsOptions(max_output_elements=self.options.max_output_elements))
        for _ in range(MAX_ROUNDS):
            infer_shapes(model)
            if not folder.run(model, ctx):
                break
            changed = True
            model.shapes_current = False
        for node in model.graph.nodes:
            if node.op in ("Shape", "Size") and node.inputs:
                shape = node.inputs[0].shape
                ctx.record(node=node.name, op=node.op, rule=f"{NAME}: kept, its input's shape {shape} is not static")
        return changed


# ------------------------------------------------------------------ resolving the policy's values
def _resolve(inputs: list[gs.Variable], dims: dict[str, int], shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """The new shape of every input that gets one; PolicyError for a contradiction."""
    by_name = {t.name: t for t in inputs}
    unknown = sorted(set(shapes) - set(by_name))
    if unknown:
        raise PolicyError(
            f"{NAME}: shapes: {', '.join(repr(u) for u in unknown)} is not a graph input; the inputs are: "
            f"{', '.join(by_name) or 'none'}"
        )
    symbolic = {d for t in inputs for d in (t.shape or []) if isinstance(d, str) and d}
    unknown = sorted(set(dims) - symbolic)
    if unknown:
        raise PolicyError(
            f"{NAME}: dims: {', '.join(repr(u) for u in unknown)} is not a symbolic dimension of any graph input; "
            f"the inputs' symbolic dimensions are: {', '.join(sorted(symbolic)) or 'none'}"
        )
    bound = dict(dims)  # symbolic name -> value, from dims and then from whole shapes
    fixed: dict[str, list[int]] = {}
    for tensor in inputs:
        if tensor.name in shapes:
            fixed[tensor.name] = _fit_shape(tensor, shapes[tensor.name], bound, dims)
    for tensor in inputs:
        if tensor.name in fixed or tensor.shape is None:
            continue
        new = [bound.get(d, d) if isinstance(d, str) else d for d in tensor.shape]
        if new != list(tensor.shape):
            fixed[tensor.name] = new
    return fixed


def _fit_shape(tensor: gs.Variable, shape: list[int], bound: dict[str, int], dims: dict[str, int]) -> list[int]:
    where = f"{NAME}: shapes: input '{tensor.name}'"
    if tensor.shape is None:
        return list(shape)
    if len(tensor.shape) != len(shape):
        raise PolicyError(f"{where} has rank {len(tensor.shape)} ({_text(tensor.shape)}), the policy gives rank {len(shape)} ({_text(shape)})")
    for axis, (old, new) in enumerate(zip(tensor.shape, shape)):
        if isinstance(old, str) and old:
            if old in bound and bound[old] != new:
                source = f"dims gives {old}={bound[old]}" if old in dims else f"another input has {old}={bound[old]}"
                raise PolicyError(f"{where}: dimension {axis} ('{old}') is {new}, but {source}")
            bound[old] = new
        elif isinstance(old, int) and old > 0 and old != new:
            raise PolicyError(f"{where}: dimension {axis} is fixed to {old} in the model, the policy says {new}")
    return list(shape)


def _text(shape: list[Any]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


# ------------------------------------------------------------------ rewriting the graph
def _apply(graph: gs.Graph, fixed: dict[str, list[int]], dims: dict[str, int]) -> bool:
    """Set the inputs' shapes, name-substitute the outputs' dims, and forget every other
    non-static shape so that inference computes it anew from the fixed inputs."""
    if not fixed:
        return False
    bound = dict(dims)
    for tensor in graph.inputs:
        if tensor.name in fixed:
            for old, new in zip(tensor.shape or [], fixed[tensor.name]):
                if isinstance(old, str) and old:
                    bound[old] = new
            tensor.shape = list(fixed[tensor.name])
    inputs = {id(t) for t in graph.inputs}
    outputs = graph_output_ids(graph)
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Variable) or id(tensor) in inputs or tensor.shape is None:
            continue
        if id(tensor) in outputs:
            tensor.shape = [bound.get(d, d) if isinstance(d, str) else d for d in tensor.shape]
        elif static_shape(tensor) is None:
            tensor.shape = None
    return True


# ------------------------------------------------------------------ adding the pass to a pipeline
def specialized_passes(specs: list[dict[str, Any]], dims: dict[str, int], shapes: dict[str, list[int]]) -> list[dict[str, Any]]:
    """A policy's ``passes`` list with these values fixed by specialize-shapes.

    A specialize-shapes already in the list gets them (they win over its own values for the same
    dimension or input); otherwise one is inserted after the leading cleanup and
    remove-identity passes: the graph is small by then, and every later pass (fusions,
    precision) sees static shapes and no shape arithmetic.
    """
    specs = [dict(spec) for spec in specs]
    index = next((i for i, spec in enumerate(specs) if spec["name"] == NAME), None)
    if index is None:
        index = 0
        while index < len(specs) and specs[index]["name"] in ("cleanup", "remove-identity"):
            index += 1
        specs.insert(index, {"name": NAME, "options": {}})
    options = dict(specs[index].get("options", {}))
    merged_dims = {**parse_dims(options.get("dims", [])), **dims}
    merged_shapes = {**parse_shapes(options.get("shapes", [])), **shapes}
    options["dims"] = [f"{name}={value}" for name, value in merged_dims.items()]
    options["shapes"] = [f"{name}={'x'.join(str(d) for d in shape)}" for name, shape in merged_shapes.items()]
    specs[index] = {"name": NAME, "options": options}
    return specs


def specialized_policy(policy: Any, dims: dict[str, int], shapes: dict[str, list[int]]) -> Any:
    """``policy`` (an onnxmp.policy.Policy) with specialize-shapes configured; see specialized_passes."""
    from onnxmp.policy import Policy, validate_policy_data

    data = {**policy.data, "passes": specialized_passes(policy.data["passes"], dims, shapes)}
    validate_policy_data(data, f"'{policy.name}' with fixed shapes")
    return Policy(f"{policy.name}+{NAME}", data, policy.folder)


def specialized_pipeline(text: str, dims: dict[str, int], shapes: dict[str, list[int]]) -> str:
    """A textual pipeline with specialize-shapes configured; see specialized_passes."""
    from onnxmp.pass_manager import registered_passes
    from onnxmp.policy import passes_from_text

    specs = [{"name": p.name, "options": dataclasses.asdict(p.options)} for p in passes_from_text(text)]
    passes = registered_passes()
    return ",".join(
        str(passes[spec["name"]](passes[spec["name"]].Options(**spec["options"])))
        for spec in specialized_passes(specs, dims, shapes)
    )
