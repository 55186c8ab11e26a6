"""Bad input raises ValueError naming the argument, before any work is done."""

import re

import pytest
import torch

import fastalign


def good():
    return {"hidden": torch.randn(2, 3, 8), "weight": torch.randn(10, 8), "targets": torch.randint(0, 10, (2, 3))}


LINEAR_ERRORS = [
    ("hidden/weight width", {"weight": torch.randn(10, 7)}, "hidden's last dimension (8) must equal weight's width"),
    ("weight not 2-D", {"weight": torch.randn(10, 8, 1)}, "weight must be 2-D"),
    ("empty vocabulary", {"weight": torch.randn(0, 8)}, "weight must have at least one row"),
    ("targets shape", {"targets": torch.randint(0, 10, (2, 4))}, "targets must have shape (2, 3)"),
    ("float targets", {"targets": torch.zeros(2, 3)}, "targets must have an integer dtype"),
    ("bool targets", {"targets": torch.zeros(2, 3, dtype=torch.bool)}, "targets must have an integer dtype"),
    ("target too large", {"targets": torch.tensor([[0, 1, 10], [2, 3, 4]])}, "targets must lie in [0, 10)"),
    ("negative target", {"targets": torch.tensor([[0, -1, 2], [2, 3, 4]])}, "targets must lie in [0, 10)"),
    (
        "dtype mismatch",
        {"weight": torch.randn(10, 8, dtype=torch.float64)},
        "hidden and weight must have the same dtype",
    ),
    ("integer hidden", {"hidden": torch.ones(2, 3, 8, dtype=torch.int64)}, "hidden must be float16, bfloat16"),
    ("bias shape", {"bias": torch.randn(9)}, "bias must have shape (10,)"),
    ("bias dtype", {"bias": torch.randn(10, dtype=torch.float64)}, "bias must have weight's dtype"),
    ("hidden not a tensor", {"hidden": [[1.0] * 8]}, "hidden must be a torch.Tensor"),
    ("temperature zero", {"temperature": 0.0}, "temperature must be a finite number > 0"),
    ("temperature negative", {"temperature": -1.0}, "temperature must be a finite number > 0"),
    ("temperature nan", {"temperature": float("nan")}, "temperature must be a finite number > 0"),
    ("softcap zero", {"softcap": 0.0}, "softcap must be None or a finite number > 0"),
    ("ignore_index float", {"ignore_index": -100.0}, "ignore_index must be an int"),
    ("backend name", {"backend": "cutlass"}, "backend must be one of 'auto', 'torch', 'triton', 'cuda'"),
]


@pytest.mark.parametrize(("case", "change", "message"), LINEAR_ERRORS, ids=[c[0] for c in LINEAR_ERRORS])
def test_linear_logprobs_rejects(case, change, message):
    kwargs = {**good(), **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        fastalign.linear_logprobs(**kwargs)


def test_out_of_range_message_counts_positions():
    kwargs = good()
    kwargs["targets"] = torch.tensor([[11, 12, 0], [-100, 3, 4]])
    with pytest.raises(ValueError, match="found 11 at 2 positions"):
        fastalign.linear_logprobs(**kwargs)


def test_ignore_index_is_allowed_outside_the_vocabulary():
    kwargs = good()
    kwargs["targets"][0, 0] = -7
    assert fastalign.linear_logprobs(**kwargs, ignore_index=-7)[0, 0] == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"label_smoothing": 1.5}, "label_smoothing must be a number in [0, 1]"),
        ({"label_smoothing": "0.1"}, "label_smoothing must be a number"),
        ({"z_loss": -1e-4}, "z_loss must be a finite number >= 0"),
        ({"softcap": -30.0}, "softcap must be None or a finite number > 0"),
        ({"targets": torch.randint(0, 10, (3, 2))}, "targets must have shape (2, 3)"),
    ],
)
def test_linear_cross_entropy_rejects(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fastalign.linear_cross_entropy(**{**good(), **change})


@pytest.mark.parametrize(
    ("logits", "targets", "message"),
    [
        (torch.randn(2, 5), torch.randint(0, 5, (3,)), "targets must have shape (2,)"),
        (torch.randn(2, 0), torch.zeros(2, dtype=torch.long), "logits must have a vocabulary dimension V >= 1"),
        (torch.tensor(1.0), torch.tensor(0), "logits must have at least one dimension"),
        (torch.randint(0, 3, (2, 5)), torch.zeros(2, dtype=torch.long), "logits must be float16, bfloat16"),
        (torch.randn(2, 5), torch.tensor([0, 5]), "targets must lie in [0, 5)"),
    ],
)
def test_logprobs_from_logits_rejects(logits, targets, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fastalign.logprobs_from_logits(logits, targets)


def test_inputs_on_different_devices_are_rejected():
    meta_weight = torch.empty(10, 8, device="meta")
    with pytest.raises(ValueError, match="hidden is on cpu but weight is on meta"):
        fastalign.linear_logprobs(torch.randn(2, 8), meta_weight, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets is on meta but the inputs are on cpu"):
        fastalign.linear_logprobs(
            torch.randn(2, 8), torch.randn(10, 8), torch.zeros(2, dtype=torch.long, device="meta")
        )


def test_bad_input_leaves_arguments_untouched():
    kwargs = good()
    before = {k: v.clone() for k, v in kwargs.items()}
    kwargs["targets"][0, 0] = 99
    with pytest.raises(ValueError):
        fastalign.linear_logprobs(**kwargs)
    assert torch.equal(kwargs["hidden"], before["hidden"]) and torch.equal(kwargs["weight"], before["weight"])
