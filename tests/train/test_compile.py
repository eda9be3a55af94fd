"""train.compile (issue 16 item 2): the compiled backbone blocks give the eager result, drop path included, and one
compilation serves every block.

Backend ``aot_eager`` (dynamo capture + AOT autograd, eager kernels) keeps the test at seconds on CPU; inductor adds
code generation on top of the same captured graphs (the benchmark times it, benchmarks/bench_fast_paths.py).
Tolerance (tests/fastpath.py): against a float64 eager run, SPREAD_FACTOR times the eager
float32 run's own spread.
"""

import copy

import torch
from fastpath import assert_matches_float64, run_backbone
from test_ssl_meta_arch import build

from franca.train.loop import compile_regions


def test_compiled_blocks_equal_eager_blocks():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters of earlier compilations in this process
    model = build(**{"model.drop_path_rate": 0.3, "model.depth": 3})  # per_sample drop path, packed multi-crop
    eager = copy.deepcopy(model.student["backbone"])
    assert compile_regions(model, {"train": {"compile": False}}) is model
    assert all(blk._compiled_call_impl is None for blk in model.student["backbone"].blocks)
    compile_regions(model, {"train": {"compile": True, "compile_backend": "aot_eager"}})
    blocks = [*model.student["backbone"].blocks, *model.teacher["backbone"].blocks]
    assert all(blk._compiled_call_impl is not None for blk in blocks)
    compiled = run_backbone(model.student["backbone"], torch.float32)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1, f"{frames} graphs for {len(model.student['backbone'].blocks)} blocks"  # no per-block compile
    reference = run_backbone(eager, torch.float32)
    reference64 = run_backbone(eager, torch.float64)
    assert_matches_float64("compiled blocks", compiled, reference, reference64)
