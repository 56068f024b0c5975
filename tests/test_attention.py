"""Every attention backend computes the same softmax attention."""

import pytest
import torch

from worldmodel.attention import attend, block_mask


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_matmul_backend_equals_sdpa(dtype, atol, masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).to(dtype) for n in (10, 25, 25))
    mask = None
    if masked:
        mask = block_mask(torch.arange(10) // 5 + 2, torch.ones(10, dtype=torch.bool),
                          torch.arange(25) // 5, torch.arange(25) >= 15)
        assert mask.any(dim=1).all()  # every query sees something
    ref = attend(q.float(), k.float(), v.float(), mask, backend="sdpa")
    got = attend(q, k, v, mask, backend="matmul")
    torch.testing.assert_close(got.float(), ref, atol=atol, rtol=atol)


def test_flash_backend_without_cuda_is_a_clear_error():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="flash-attn needs CUDA"):
        attend(q, q, q, backend="flash")
