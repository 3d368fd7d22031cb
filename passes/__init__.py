"""The built-in passes, one module each. Importing this package registers them all."""

from onnxmp.passes import (  # noqa: F401
    cast_elimination,
    cleanup,
    common_subexpression,
    constant_folding,
    fold_batchnorm,
    fusion_attention,
    fusion_embed_layernorm,
    fusion_gelu,
    fusion_gemm,
    fusion_layernorm,
    fusion_rowwise_gemm,
    fusion_skip_layernorm,
    identity_removal,
    precision,
    qdq_insertion,
    scale_folding,
    simplify_padding_mask,
    specialize_shapes,
)
