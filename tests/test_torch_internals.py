"""The private torch APIs tinyseek relies on where torch offers no public one: each test pins the behaviour used, so
a torch upgrade that changes it fails here rather than silently in training or decoding."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tinyseek.moe import in_backward_recomputation


def test_current_graph_task_id_tells_a_checkpointed_recompute_from_the_forward():
    # tinyseek.moe counts expert load in the forward only: the recompute inside backward must not count again.
    seen = []

    def layer(x):
        seen.append(in_backward_recomputation())
        return x.sin()

    x = torch.randn(4, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert seen == [False, True]
    assert torch._C._current_graph_task_id() == -1


def test_tensor_version_counts_in_place_writes_and_nothing_else():
    # generate/lean.py keys its rearranged weights on (data_ptr, _version): an in-place update must change the key,
    # reading must not.
    weight = torch.nn.Linear(4, 4).weight
    before = (weight.data_ptr(), weight._version)
    _ = weight * 2, weight.sum(), weight.T
    assert (weight.data_ptr(), weight._version) == before
    with torch.no_grad():
        weight.add_(1)
    assert weight.data_ptr() == before[0] and weight._version > before[1]
    module = torch.nn.Linear(4, 4)
    version = module.weight._version
    module.load_state_dict({"weight": torch.ones(4, 4), "bias": torch.zeros(4)})
    assert module.weight._version > version


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped matmul (one matmul per expert)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_multiplies_each_group_of_rows_by_its_own_matrix(dtype):
    # tinyseek.moe.expert_swiglu: rows sorted by expert, offs = the cumulative row counts (int32).
    torch.manual_seed(0)
    rows_per_expert = torch.tensor([3, 0, 5, 8])
    x, weights = torch.randn(16, 16, dtype=dtype), torch.randn(4, 16, 8, dtype=dtype)
    grouped = torch._grouped_mm(x, weights, offs=rows_per_expert.cumsum(0).to(torch.int32))
    per_expert = torch.cat([rows @ weights[e] for e, rows in enumerate(x.split(rows_per_expert.tolist()))])
    torch.testing.assert_close(grouped.float(), per_expert.float(), rtol=1e-2, atol=1e-2)
