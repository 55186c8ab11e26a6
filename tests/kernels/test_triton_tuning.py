"""How the policy and DPO Triton kernels are tuned and addressed, beyond what their values show.

* Autotuning: triton's ``Autotuner`` benchmarks its configs once per distinct key (the values of the arguments
  named in ``key``, plus every tensor argument's dtype) and caches the winner under it. The key must name what
  decides the best config: the row length bucketed by the launcher (a GRPO batch's T changes every step) and
  every constexpr variant flag (each compiles to a different kernel). The interpreter gets one config, which the
  Autotuner never benchmarks, so these tests give it two interpreter-sized configs and a counting stub for the
  benchmark.
* Offsets: ``row * stride_row`` must be computed in int64; the interpreter wraps int32 arithmetic as the GPU does.
"""

import inspect
import types

import pytest
import torch
import triton
import triton.language as tl

import fastalign
from fastalign.kernels.triton import dpo_loss as dpo_kernels
from fastalign.kernels.triton import linear_stats as linear_kernels
from fastalign.kernels.triton import policy_loss as policy_kernels
from fastalign.ops import _policy_math

POLICY = [policy_kernels.policy_loss_fwd_kernel, policy_kernels.policy_loss_bwd_kernel]
DPO = [dpo_kernels.dpo_fwd_kernel, dpo_kernels.dpo_bwd_kernel]


def test_autotune_bucket_is_the_next_power_of_two_clamped():
    from fastalign.kernels.triton.softmax_tile import autotune_bucket

    lengths = [0, 1, 9, 255, 256, 257, 511, 512, 513, 4097, 8192, 8193, 1 << 20]
    assert [autotune_bucket(t) for t in lengths] == [256] * 5 + [512] * 3 + [1024, 8192, 8192, 8192, 8192]


@pytest.mark.parametrize("kernel", POLICY + DPO, ids=lambda k: k.base_fn.__name__)
def test_autotune_key_is_the_bucket_and_every_variant_flag(kernel):
    """The key names T_BUCKET (not T) and every constexpr argument the configs do not set."""
    parameters = inspect.signature(kernel.base_fn).parameters
    tuned = {name for config in kernel.configs for name in config.kwargs}
    flags = {name for name, p in parameters.items() if p.annotation is tl.constexpr} - tuned
    assert set(kernel.keys) == {"T_BUCKET"} | flags
    assert set(kernel.keys) <= set(kernel.arg_names)


def counting_tuner(monkeypatch, kernel, configs):
    """Give ``kernel``'s Autotuner ``configs`` and an empty cache; returns the list of benchmarked configs."""
    benchmarked = []

    def bench(*args, config, **meta):
        benchmarked.append(config)
        return [float(configs.index(config))]  # the first config wins

    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench", bench)
    return benchmarked


def policy_step(width, **options):
    """policy_loss forward and backward on the Triton backend, checked against the torch backend."""
    gen = torch.Generator().manual_seed(width)
    logp = -torch.rand(2, width, generator=gen)
    tensors = {
        "old_logp": logp + 0.3 * torch.randn(2, width, generator=gen),
        "advantages": torch.randn(2, generator=gen),
        "mask": (torch.rand(2, width, generator=gen) > 0.2).float(),
    }
    for name in ("ref_logp", "entropy"):
        if options.pop(name, False):
            tensors[name] = logp + 0.2 * torch.randn(2, width, generator=gen)
    if options.pop("is_weights", False):
        tensors["is_weights"] = torch.rand(2, width, generator=gen) + 0.5
    results = []
    for backend in ("torch", "triton"):
        leaf = logp.clone().requires_grad_()
        loss, _ = fastalign.policy_loss(leaf, **tensors, **options, backend=backend)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_policy_kernels_tune_once_per_length_bucket_and_per_variant(monkeypatch):
    configs = [triton.Config({"BLOCK_T": 4}), triton.Config({"BLOCK_T": 8})]
    benchmarked = {kernel: counting_tuner(monkeypatch, kernel, configs) for kernel in POLICY}

    def tunings():
        return [(len(kernel.cache), len(benchmarked[kernel])) for kernel in POLICY]

    for width in (5, 9, 200):  # one bucket: tuned once, the winner reused
        policy_step(width)
    assert tunings() == [(1, 2), (1, 2)]
    policy_step(300)  # the next bucket
    assert tunings() == [(2, 4), (2, 4)]
    variants = [
        {"is_weights": True},
        {"dual_clip": 3.0},
        {"ref_logp": True, "kl_coef": 0.1, "kl_estimator": "k1"},
        {"ref_logp": True, "kl_coef": 0.1, "kl_estimator": "k2"},
        {"entropy": True, "entropy_coef": 0.01},
        {"importance_sampling_level": "sequence"},
    ]
    for count, options in enumerate(variants, start=3):
        policy_step(9, **options)
        assert tunings() == [(count, 2 * count)] * 2, options
    policy_step(17, **variants[0])  # a variant seen before, in a bucket seen before: no new tuning
    assert tunings() == [(8, 16)] * 2


def test_dpo_kernels_tune_once_per_length_bucket_and_per_loss_plan(monkeypatch):
    forward = counting_tuner(
        monkeypatch, dpo_kernels.dpo_fwd_kernel,
        [triton.Config({"BLOCK_P": 2, "BLOCK_T": 8}), triton.Config({"BLOCK_P": 1, "BLOCK_T": 4})],
    )  # fmt: skip
    backward = counting_tuner(
        monkeypatch, dpo_kernels.dpo_bwd_kernel,
        [triton.Config({"BLOCK_R": 2, "BLOCK_T": 8}), triton.Config({"BLOCK_R": 1, "BLOCK_T": 4})],
    )  # fmt: skip

    def step(width, **options):
        gen = torch.Generator().manual_seed(width)
        token_logps = -torch.rand(4, width, generator=gen)
        mask, ref = torch.rand(4, width, generator=gen) > 0.2, torch.randn(4, generator=gen)
        results = []
        for backend in ("torch", "triton"):
            leaf = token_logps.clone().requires_grad_()
            losses, _, _ = fastalign.dpo_loss_from_token_logps(leaf, mask, ref, **options, backend=backend)
            losses.sum().backward()
            results.append((losses.detach(), leaf.grad))
        for got, expected in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    for width in (5, 9, 200):
        step(width)
    assert (len(forward), len(backward)) == (2, 2)
    step(300)
    assert (len(forward), len(backward)) == (4, 4)
    step(9, loss_type="ipo")  # another loss plan: the forward kernel differs, the backward does not
    step(9, loss_type="sigmoid", average_log_prob=True)
    assert (len(forward), len(backward)) == (8, 4)
    assert (len(dpo_kernels.dpo_fwd_kernel.cache), len(dpo_kernels.dpo_bwd_kernel.cache)) == (4, 2)


def huge_row_stride_view(rows, width, stride, offset, values=None):
    """A ``[rows, width]`` float16 view with row stride ``stride`` starting ``offset`` elements into a buffer that
    spans it (8 GiB of address space for the strides below, of which only the rows' pages are ever touched)."""
    try:
        buffer = torch.empty(offset + (rows - 1) * stride + width + 64, dtype=torch.float16)
    except RuntimeError as error:  # an address-space limit (ulimit -v, strict overcommit)
        pytest.skip(f"cannot reserve {offset + rows * stride} float16 elements of address space: {error}")
    buffer[:64].zero_()  # where the rows land when their offsets wrap in int32 (see below)
    view = buffer.as_strided((rows, width), (stride, 1), offset)
    view.copy_(values) if values is not None else view.fill_(float("nan"))
    return view


def test_policy_kernels_address_rows_past_two_to_the_31():
    """``row * stride_row`` past 2^31 elements (a [B, T] batch of more than 2^31 tokens, here with a huge row
    stride over untouched memory): in int32 row 2 would read and write 2^32 elements early, at the zeroed start
    of the buffer (empty mask: no tokens, no gradient written). Every per-row pointer (log-probs, mask,
    per-token advantages and importance weights, entropy, gradient) shares the view."""
    rows, width, stride, offset = 3, 6, (1 << 30) + 8, 1 << 31  # row 2 starts 2^31 + 16 elements in
    assert 2 * stride >= 1 << 31 and stride < 1 << 31
    gen = torch.Generator().manual_seed(0)
    values = (-torch.rand(rows, width, generator=gen) - 0.1).half()  # nonzero: every token is kept
    view = huge_row_stride_view(rows, width, stride, offset, values)
    grad = huge_row_stride_view(rows, width, stride, offset)
    scalars = {
        "B": rows, "T": width, "T_BUCKET": 256, "stride_row": stride, "stride_adv_row": stride, "stride_adv_t": 1,
        "stride_is_row": stride, "stride_is_t": 1, "clip_low": 0.8, "clip_high": 1.2, "dual_clip": 0.0,
        "delta": float("inf"), "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05, "kl_coef": 0.0,
        "entropy_coef": 0.0, "LIMIT": 20.0, "SEQUENCE": False, "HAS_REF": True, "HAS_IS": True, "DUAL": False,
        "KL_KIND": 3, "OBJECTIVE": 0, "BIAS_KL": False,
    }  # fmt: skip
    # logp = old_logp = ref_logp (ratio 1, KL 0) = entropy = advantages = importance weights = mask = values v:
    # per token loss = -A·ratio·w = -v², entropy v.
    stats = torch.zeros(8, rows)
    policy_kernels.policy_loss_fwd_kernel[(rows,)](*[view] * 7, stats, **scalars, HAS_ENTROPY=True)
    v = values.double()
    tokens = torch.full((rows,), float(width), dtype=torch.float64)
    expected = {
        _policy_math.LOSS: -(v**2).sum(1),
        _policy_math.COUNT: tokens,
        _policy_math.RATIO: tokens,
        _policy_math.ENTROPY: v.sum(1),
    }
    for stat, value in expected.items():  # float32 sums of 6 terms
        torch.testing.assert_close(stats[stat].double(), value, rtol=1e-6, atol=0)
    weights = torch.tensor([1.0, 2.0, 3.0])
    policy_kernels.policy_loss_bwd_kernel[(rows,)](*[view] * 6, weights, grad, grad, **scalars, HAS_ENTROPY=False)
    # d/dlogp of -A·ratio·w at ratio 1 is -v², times the row weight; float32, stored as float16.
    torch.testing.assert_close(grad, (-(values.float() ** 2) * weights[:, None]).half(), rtol=0, atol=0)


# --------------------------------------------------------------------------- tuning when an output aliases an input


def benchmark_runs_the_kernel(monkeypatch, kernel, configs, runs=3):
    """Give ``kernel``'s Autotuner ``configs``, an empty cache and a benchmark that, like ``do_bench``, runs the
    kernel ``runs`` times on the buffers it was given per config (the last config wins)."""
    benchmarked = []

    def bench(*args, config, **meta):
        benchmarked.append(config)
        for _ in range(runs):
            kernel.fn.run(*args, **meta, **config.all_kwargs())
        return [float(len(configs) - configs.index(config))]

    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench", bench)
    return benchmarked


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_in_place_logits_gradient_is_right_on_the_call_that_tunes(monkeypatch, softcap):
    """The first in-place backward per autotune key tunes the gradient kernel: its benchmark runs must not read
    their own output as logits (they did: max error 0.30 against 1e-8 out of place). Checked against float64:
    one float32 softmax gradient per element, so a few float32 ulps of 1."""
    from fastalign.kernels.triton import logits_stats
    from fastalign.ops import _triton_backend

    kernel = logits_stats.logits_grad_kernel
    configs = [triton.Config({"BLOCK_N": 2, "BLOCK_V": 32}), triton.Config({"BLOCK_N": 4, "BLOCK_V": 16})]
    benchmarked = benchmark_runs_the_kernel(monkeypatch, kernel, configs)
    monkeypatch.setattr(_triton_backend, "_IN_PLACE_CONFIGS", {})
    gen = torch.Generator().manual_seed(7)
    logits = 3 * torch.randn(5, 37, generator=gen)  # neither dimension a multiple of a block
    targets = torch.randint(0, 37, (5,), generator=gen)
    weights = torch.randn(5, generator=gen)

    def gradients(backend, inplace, dtype=torch.float32):
        leaf = logits.to(dtype, copy=True).requires_grad_()
        source = leaf * 1  # in place needs a non-leaf that nothing else reads
        logp, entropy = fastalign.logprobs_from_logits(
            source, targets, softcap=softcap, return_entropy=True, inplace_backward=inplace, backend=backend
        )
        ((logp + 0.5 * entropy) * weights.to(dtype)).sum().backward()
        return leaf.grad

    expected = gradients("torch", False, torch.float64)
    for call in range(2):  # the call that tunes, then one that reuses the winner
        torch.testing.assert_close(gradients("triton", True).double(), expected, rtol=0, atol=1e-6)
        assert len(benchmarked) == 2, call  # tuned once, out of place, then reused
    assert _triton_backend._IN_PLACE_CONFIGS and list(_triton_backend._IN_PLACE_CONFIGS.values()) == [configs[1]]
    torch.testing.assert_close(gradients("triton", False).double(), expected, rtol=0, atol=1e-6)
    assert len(benchmarked) == 2  # the out-of-place launch shares the tuning


# --------------------------------------------------------------------------- matmul kernels' tiles by dtype and target


def fake_device(monkeypatch, capability, shared=None):
    """torch.cuda's answers for a device of ``capability`` (``(major, minor)``) with ``shared`` bytes per block."""
    properties = types.SimpleNamespace(multi_processor_count=132)
    if shared is not None:
        properties.shared_memory_per_block_optin = shared
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)


LINEAR_PRUNED = [
    (linear_kernels.linear_stats_fwd_kernel, "hidden_ptr", linear_kernels._LOGIT_CONFIGS),
    (linear_kernels.linear_grad_logits_kernel, "hidden_ptr", linear_kernels._LOGIT_CONFIGS),
    (linear_kernels.matmul_accumulate_kernel, "a_ptr", linear_kernels._MATMUL_KIND_CONFIGS),
]


@pytest.mark.parametrize("kernel,operand,kinds", LINEAR_PRUNED, ids=lambda k: getattr(k, "__name__", ""))
@pytest.mark.parametrize(
    "dtype,precision,kind", [(torch.bfloat16, "tf32", "half"), (torch.float16, "tf32", "half"),
                             (torch.float32, "tf32", "tf32"), (torch.float32, "ieee", "ieee")],
)  # fmt: skip
@pytest.mark.parametrize("capability,architecture", [((8, 0), 8), ((9, 0), 9), ((10, 0), 9)])
def test_linear_kernels_take_the_tiles_measured_for_the_dtype_and_target(
    monkeypatch, kernel, operand, kinds, dtype, precision, kind, capability, architecture
):
    """The tile lists bench.aot measured (no spills, shared memory inside the A100/H100 limit) are the ones a
    launch can pick: by dtype, dot precision and architecture, through the autotuner's own pruning hook."""
    fake_device(monkeypatch, capability)
    prune = kernel.early_config_prune
    picked = prune(kernel.configs, {operand: torch.empty(0, dtype=dtype)}, DOT_PRECISION=precision)
    assert picked == kinds[(kind, architecture)] and picked
    limit = linear_kernels._SHARED_LIMIT[architecture]
    assert max(linear_kernels.shared_bytes(c, dtype.itemsize) for c in picked) <= limit


def test_linear_kernels_leave_out_tiles_beyond_the_device_shared_memory(monkeypatch):
    """An sm_86 / sm_89 part allows 99 KiB per block, less than the A100 the sm_80 tiles were sized for."""
    kernel = linear_kernels.linear_stats_fwd_kernel
    hidden = {"hidden_ptr": torch.empty(0, dtype=torch.bfloat16)}
    fake_device(monkeypatch, (8, 9), shared=99 * 1024)
    picked = kernel.early_config_prune(kernel.configs, hidden, DOT_PRECISION="tf32")
    every = linear_kernels._LOGIT_CONFIGS[("half", 8)]
    assert picked == [c for c in every if linear_kernels.shared_bytes(c, 2) <= 99 * 1024]
    assert 0 < len(picked) < len(every)
    fake_device(monkeypatch, (8, 0))  # no opt-in limit reported (torch < 2.6): the A100's
    assert kernel.early_config_prune(kernel.configs, hidden, DOT_PRECISION="tf32") == every


def test_shared_bytes_is_an_upper_bound_of_what_triton_allocates():
    """Measured by bench.aot with triton 3.9: 128 x 128 x 64 bf16 in 3 stages takes 98304 B on sm_90
    (three stages of both operands) and 65536 B on sm_80 (two): the estimate is the sm_90 figure."""
    config = triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3)
    assert linear_kernels.shared_bytes(config, 2) == 98304


@pytest.mark.parametrize("kernel", [k for k, _, _ in LINEAR_PRUNED], ids=lambda k: k.base_fn.__name__)
def test_linear_autotune_keys_name_every_flag_that_changes_the_code(kernel):
    """Every constexpr the configs do not set changes the compiled kernel (float32 IEEE vs TF32 dots most of
    all: a different tile list), so each is in the key; the sizes that decide the best tile are too."""
    parameters = inspect.signature(kernel.base_fn).parameters
    tuned = {name for config in kernel.configs for name in config.kwargs}
    flags = {name for name, p in parameters.items() if p.annotation is tl.constexpr} - tuned - {"UPCAST"}
    assert flags <= set(kernel.keys)
