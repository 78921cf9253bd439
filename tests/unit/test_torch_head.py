"""The rescored output projection: bf16 for all logits, exact fp32 for the top k."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from inference.backends.torch_head import rescored_head  # noqa: E402


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def test_a_near_tie_that_bf16_cannot_see_is_decided_in_fp32() -> None:
    # Rows 3 and 7 differ by less than bf16's resolution: rounded, they tie (argmax 3);
    # in fp32 row 7 is larger. The rescored head must pick 7, as the fp32 head does.
    weight = torch.randn(16, 8) * 0.01
    weight[3] = 1.0
    weight[7] = 1.0 + 1e-4
    hidden = torch.ones(1, 1, 8)
    exact = _linear(weight)
    assert torch.nn.functional.linear(hidden.bfloat16(), weight.bfloat16()).argmax() == 3
    with torch.no_grad():
        assert exact(hidden).argmax().item() == 7
        assert rescored_head(exact)(hidden).argmax().item() == 7


def test_top_k_logits_are_exact_and_the_rest_close() -> None:
    torch.manual_seed(0)
    lin = _linear(torch.randn(4096, 64))
    head = rescored_head(lin, k=8)
    hidden = torch.randn(5, 1, 64)
    with torch.no_grad():
        want, got = lin(hidden), head(hidden)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    top = want.topk(8, dim=-1).indices
    assert torch.allclose(got.gather(-1, top), want.gather(-1, top), rtol=0, atol=1e-5)
    assert torch.allclose(got, want, rtol=0.02, atol=0.1)  # the tail: bf16-rounded


def test_the_weight_is_shared_not_copied() -> None:
    lin = _linear(torch.randn(32, 8))
    head = rescored_head(lin)
    assert head.exact is lin.weight
    assert head.approx.dtype == torch.bfloat16


def test_refuses_what_it_does_not_support() -> None:
    with pytest.raises(ValueError, match="bias"):
        rescored_head(torch.nn.Linear(8, 16, bias=True))
    with pytest.raises(ValueError, match="k must"):
        rescored_head(torch.nn.Linear(8, 16, bias=False), k=0)
