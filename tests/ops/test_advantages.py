"""gae and group_advantages against their references, and bad input."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastalign
from fastalign.ops import reference_losses


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), width=st.integers(0, 12), seed=st.integers(0, 1000),
       gamma=st.sampled_from([1.0, 0.99, 0.5]), lam=st.sampled_from([1.0, 0.95, 0.0]))  # fmt: skip
def test_gae_matches_reference(rows, width, seed, gamma, lam):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    values = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    mask = (torch.rand(rows, width, generator=gen) > 0.3).double()  # gaps included: masked tokens are skipped
    advantages, returns = fastalign.gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_advantages, ref_returns = reference_losses.gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(advantages, ref_advantages)
    torch.testing.assert_close(returns, ref_returns)


def test_gae_with_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    advantages, returns = fastalign.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.8, 0.9, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("group_size", [1, 4])
def test_group_advantages_match_reference(scale, group_size):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 2.0, -1.0], dtype=torch.float64)
    got = fastalign.group_advantages(rewards, group_size, scale=scale)
    torch.testing.assert_close(got, reference_losses.group_advantages(rewards, group_size, scale=scale))
    assert torch.isfinite(got).all()


def test_group_advantages_of_equal_rewards_are_zero():
    assert torch.equal(fastalign.group_advantages(torch.ones(6), 3), torch.zeros(6))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fastalign.group_advantages(torch.ones(5), 2), "is not a multiple of group_size=2"),
        (lambda: fastalign.group_advantages(torch.ones(4), 0), "group_size must be an int >= 1"),
        (lambda: fastalign.group_advantages(torch.ones(4), 2, scale="rank"), "scale must be one of"),
        (lambda: fastalign.group_advantages(torch.ones(2, 2), 2), "rewards must be a 1-D float tensor"),
        (lambda: fastalign.gae(torch.ones(2, 3), torch.ones(2, 4), torch.ones(2, 3)), "values must have shape (2, 3)"),
        (lambda: fastalign.gae(*[torch.ones(2, 3)] * 3, lam=1.5), "lam must be a number in [0, 1]"),
    ],
)  # fmt: skip
def test_advantages_reject(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
