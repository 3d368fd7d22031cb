"""onnxmp: turn an FP32 ONNX model into a faster mixed-precision one inside an accuracy budget."""

from onnxmp import _source_passes

__version__ = "0.1.0"

_source_passes.install()

from onnxmp.errors import OnnxmpError  # noqa: E402
from onnxmp.ir import Model  # noqa: E402
from onnxmp.pass_manager import Pass, PassContext, Pipeline, register  # noqa: E402
from onnxmp.policy import Policy, load_policy  # noqa: E402
from onnxmp.api import optimize, optimize_model  # noqa: E402

__all__ = [
    "Model",
    "OnnxmpError",
    "Pass",
    "PassContext",
    "Pipeline",
    "Policy",
    "load_policy",
    "optimize",
    "optimize_model",
    "register",
]
