"""Our torch-free reader of `torch.save` files against torch itself (the oracle writes them)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from mrrm_jax.interop import torch_files


def test_a_state_dict_reads_as_torch_wrote_it(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = collections.OrderedDict(
        weight=torch.randn(5, 3),
        transposed=base.t(),  # non-contiguous strides
        row_view=base[2, 1:5],  # an offset into a storage another tensor shares
        bf16=torch.randn(3, 2).to(torch.bfloat16),
        half=torch.randn(7).half(),
        int64=torch.tensor([1, -2, 3]),
        flags=torch.tensor([True, False]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 4),
        parameter=torch.nn.Parameter(torch.ones(2, 2)),
    )
    torch.save(state, tmp_path / "head.pt")
    ours = torch_files.load_state_dict(tmp_path / "head.pt")
    assert list(ours) == list(state)
    for name, tensor in state.items():
        expected = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
        got = ours[name].astype(np.float32) if tensor.dtype == torch.bfloat16 else ours[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_anything_but_tensors_is_refused(tmp_path):
    torch.save({"weight": torch.ones(2), "extra": collections.Counter("ab")}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd\.pt.*collections\.Counter is not allowed"):
        torch_files.load_state_dict(tmp_path / "odd.pt")
    (tmp_path / "text.pt").write_text("not a zip")
    with pytest.raises(ValueError, match=r"text\.pt: not a readable torch\.save state dict"):
        torch_files.load_state_dict(tmp_path / "text.pt")
