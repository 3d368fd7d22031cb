"""Exceptions of onnxmp. Every message says what is wrong and what to do about it."""


class OnnxmpError(Exception):
    """Base of every error onnxmp raises on purpose; the CLI prints it as one line."""


class ModelLoadError(OnnxmpError):
    """The input model could not be read."""


class ModelSaveError(OnnxmpError):
    """The output model could not be written."""


class PolicyError(OnnxmpError):
    """The policy is invalid; the message names the JSON path of the bad field."""


class PassError(OnnxmpError):
    """A pass could not be built or failed while running."""


class VerificationError(OnnxmpError):
    """A pass left a model that fails onnx.checker or does not load in onnxruntime."""


class DataError(OnnxmpError):
    """Calibration or validation data does not match the model."""


class ValidationError(OnnxmpError):
    """The candidate model failed an accuracy gate."""
