"""The graph clean-up after the dynamo exporter: onnxscript's optimizer with a measured rule set.

`torch.onnx.export(optimize=True)` runs onnxscript's `optimize_ir`: constant folding plus ~40 pattern
rewrite rules, twice. On the knee3d denoiser (2-core Zen 1) that took 25 s of a 50 s export, 22 s of
it in the rewrite matcher, and most rules never fire on these graphs. Measured rule by rule on the
knee3d denoiser (1,056 nodes after folding alone, 1,019 with every rule): materialize-reshape-shape
removes 26 nodes, transpose-transpose 9, squeeze-reshape-1d 2, pad-into-conv 2; slice-split (5 s),
broadcast-to-matmul, cast-of-constant-of-shape, min-max-to-clip, relu/clip fusion, scatter-nd,
unsqueeze-unsqueeze and flatten-to-reshape removed nothing. The cheap rules that can fire on a
conv/norm/attention network stay (the no-op, cast, reshape, transpose, slice, batch-norm and bias
rules), so the graphs have the same or fewer nodes than the full optimizer's, checked by
tests/export/test_optimize.py; the passes after the loop are optimize_ir's own.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding
from onnxscript.rewriter import (
    _collapse_slices,
    _fuse_batchnorm,
    _fuse_pad_into_conv,
    _materialize_reshape_shape,
    _no_op,
    _remove_optional_bias,
)
from onnxscript.rewriter.rules.common import _basic_rules

RULES = rewriter.RewriteRuleSet(
    [
        *_no_op.rules,
        *_materialize_reshape_shape.rules,
        *_collapse_slices.rules,
        *_fuse_pad_into_conv.rules,
        *_fuse_batchnorm.rules,
        *_remove_optional_bias.rules,
        _basic_rules.cast_cast_rule,
        _basic_rules.no_op_cast_rule,
        _basic_rules.no_op_expand_rule,
        _basic_rules.reshape_reshape_rule,
        _basic_rules.no_op_transpose_rule,
        _basic_rules.transpose_transpose_rule,
        _basic_rules.squeeze_reshape_1d_rule,
    ]
)


def optimize(model: ir.Model) -> None:
    """onnxscript's optimize_ir (inline, fold, rewrite, clean up), in place, with RULES only."""
    folding = _constant_folding.FoldConstantsPass(
        shape_inference=True,
        input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
    )
    loop = ir.passes.PassManager(
        [
            folding,
            rewriter.RewritePass(RULES),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedFunctionsPass(),
            common_passes.RemoveUnusedOpsetsPass(),
        ],
        steps=2,
        early_stop=True,
    )
    ir.passes.Sequential(
        common_passes.InlinePass(),
        loop,
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)
