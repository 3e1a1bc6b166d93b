"""Postprocessors on tier edges: validation, clipping, codecs (and DP noise, privacy/)."""

from hierfed.postprocess.base import PostContext, Postprocessor, apply_chain, build_chain
from hierfed.postprocess.clip import Clip
from hierfed.postprocess.codecs import Fp16, Int8, TopK
from hierfed.postprocess.validate import Expectation, validate_update

__all__ = [
    "Clip",
    "Expectation",
    "Fp16",
    "Int8",
    "PostContext",
    "Postprocessor",
    "TopK",
    "apply_chain",
    "build_chain",
    "validate_update",
]
