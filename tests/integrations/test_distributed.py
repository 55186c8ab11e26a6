"""Multi-process training on CPU (gloo, 2 processes): one step of the SFT, DPO, reward, GRPO (every loss type)
and PPO trainers under DDP, launched with ``accelerate launch --config_file <yaml>``, gives the loss and the
updated weights of a single process on the same global batch; so do the SFT and GRPO losses under FSDP2
(``fully_shard``), and the fused cross-entropy on a sharded lm_head lands its gradient on the right rows of each
rank's shard. GRPO and PPO roll out with a fixed engine (completions a function of the prompt), so both runs
train on the same completions and the comparison tests the gradient synchronisation and the normalisation.

accelerate cannot run FSDP on CPU: ``AcceleratorState`` only honours an FSDP plugin when the process group is a
multi-accelerator one (``accelerate/state.py``, the ``elif self.distributed_type in [DistributedType.MULTI_GPU,
...]`` branch), and a CPU group is ``MULTI_CPU``, so an FSDP config silently trains with DDP there. The FSDP2 cases
therefore shard with ``torch.distributed.fsdp.fully_shard`` inside the same accelerate-launched processes.

This file is also the worker: ``PYTHONPATH=tests accelerate launch tests/integrations/test_distributed.py <out_dir>``
runs every case in one process group and writes the results to ``<out_dir>``; the tests compare them with
single-process runs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from helpers.tiny import NUMBERS, addition_rows, tiny_causal_lm, word_tokenizer
from helpers.trainer_reward import tiny_reward_model

from fastalign.rollout import RolloutBatch
from fastalign.rollout._types import completion_mask_after_eos, left_pad
from fastalign.trainers import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from fastalign.trainers.configs import GRPOConfig, PPOConfig
from fastalign.trainers.grpo import GRPOTrainer
from fastalign.trainers.ppo import PPOTrainer

WORLD = 2
GLOBAL_BATCH = 4  # rows (SFT) or pairs (DPO): the whole dataset, so every run trains on the same examples
LR = 1.0  # plain SGD without clipping: the update is -LR * gradient, so a wrong gradient scale shows at once
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}

ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
machine_rank: 0
num_processes: 2
mixed_precision: 'no'
"""
# MULTI_GPU (not `--cpu`): with --cpu, accelerate launch starts one process unless it goes through mpirun. The
# script's use_cpu=True then makes the group a gloo one on CPU.


def sft_rows() -> list[dict[str, str]]:
    return addition_rows()[:GLOBAL_BATCH]


def dpo_rows() -> list[dict[str, str]]:
    return [
        {"prompt": f"add one to {NUMBERS[n]} . the answer is", "chosen": f" {NUMBERS[n + 1]} .",
         "rejected": f" {NUMBERS[(n + 4) % 10]} ."}
        for n in range(GLOBAL_BATCH)
    ]  # fmt: skip


def common_options(out: Path, world: int) -> dict:
    return {
        "output_dir": str(out), "per_device_train_batch_size": GLOBAL_BATCH // world, "learning_rate": LR,
        "optim": "sgd", "lr_scheduler_type": "constant", "max_grad_norm": 0.0, "max_steps": 1, "logging_steps": 1,
        "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0, "disable_tqdm": True, "max_length": 32,
    }  # fmt: skip


def sft_trainer(layout: str, out: Path, world: int) -> SFTTrainer:
    return SFTTrainer(
        tiny_causal_lm(layout), args=SFTConfig(**common_options(out, world)),
        train_dataset=datasets.Dataset.from_list(sft_rows()), processing_class=word_tokenizer(),
    )  # fmt: skip


def dpo_trainer(out: Path, world: int) -> DPOTrainer:
    return DPOTrainer(
        tiny_causal_lm("llama"), ref_model=tiny_causal_lm("llama", seed=1),  # non-zero log-ratios from step one
        args=DPOConfig(**common_options(out, world), beta=0.5), train_dataset=datasets.Dataset.from_list(dpo_rows()),
        processing_class=word_tokenizer(),
    )  # fmt: skip


def reward_trainer(out: Path, world: int) -> RewardTrainer:
    return RewardTrainer(
        tiny_reward_model("llama"), args=RewardConfig(**common_options(out, world), center_rewards_coefficient=0.1),
        train_dataset=datasets.Dataset.from_list(dpo_rows()), processing_class=word_tokenizer(),
    )  # fmt: skip


EOS, MAX_COMPLETION = 3, 6


class FixedEngine:
    """A rollout engine whose completions depend only on the prompt: lengths from 1 to ``MAX_COMPLETION`` tokens
    (some end with EOS, some are cut), so that processes with different prompts hold different token counts."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to synchronise: the engine holds no weights."""

    def generate(self, prompts: list[list[int]], params, *, seed: int | None = None) -> RolloutBatch:
        completions = []
        for prompt in prompts:
            for g in range(params.num_generations):
                rng = torch.Generator().manual_seed(1000 * sum(prompt) + g)
                length = int(torch.randint(1, MAX_COMPLETION + 1, (1,), generator=rng))
                tokens = torch.randint(6, 25, (length,), generator=rng).tolist()
                completions.append([*tokens, EOS] if length < MAX_COMPLETION - 1 else tokens)
        prompt_ids, prompt_mask = left_pad(prompts, 0)
        width = max(len(c) for c in completions)
        completion_ids = torch.tensor([c + [0] * (width - len(c)) for c in completions])
        completion_mask, truncated = completion_mask_after_eos(completion_ids, [EOS])
        g = params.num_generations
        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(g, dim=0), prompt_mask=prompt_mask.repeat_interleave(g, dim=0),
            completion_ids=completion_ids, completion_mask=completion_mask, truncated=truncated,
        )  # fmt: skip


def id_reward(completion_ids, **kwargs) -> list[float]:
    """Differs between the completions of one prompt: non-zero advantages."""
    return [float(sum(ids) % 5) for ids in completion_ids]


def rl_options(out: Path, world: int, global_rows: int, accumulation: int = 1) -> dict:
    return {
        "output_dir": str(out), "per_device_train_batch_size": global_rows // world // accumulation,
        "gradient_accumulation_steps": accumulation, "learning_rate": LR, "optim": "sgd",
        "lr_scheduler_type": "constant", "max_grad_norm": 0.0, "max_steps": 1, "logging_steps": 1,
        "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0, "disable_tqdm": True,
    }  # fmt: skip


GRPO_PROMPTS = [{"prompt": f"what is {NUMBERS[n]} plus one ?"} for n in (2, 7)]  # one prompt per process
GRPO_CASES = {  # name: GRPOConfig options (the 8 completions of a step: 2 prompts x 4)
    "dapo": {"loss_type": "dapo"},
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo", "scale_rewards": "batch"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "dapo-accumulated": {"loss_type": "dapo", "gradient_accumulation_steps": 2, "beta": 0.04, "temperature": 0.7},
}


def grpo_trainer(case: str, out: Path, world: int) -> GRPOTrainer:
    options = dict(GRPO_CASES[case])
    accumulation = options.pop("gradient_accumulation_steps", 1)
    args = GRPOConfig(**rl_options(out, world, 8, accumulation), num_generations=4,
                      max_completion_length=MAX_COMPLETION, **options)  # fmt: skip
    return GRPOTrainer(
        tiny_causal_lm("llama"), reward_funcs=id_reward, args=args, processing_class=word_tokenizer(),
        train_dataset=datasets.Dataset.from_list(GRPO_PROMPTS), rollout_engine=FixedEngine(),
    )  # fmt: skip


def ppo_trainer(out: Path, world: int) -> PPOTrainer:
    args = PPOConfig(**rl_options(out, world, 4), response_length=MAX_COMPLETION, num_ppo_epochs=1, temperature=0.8)
    rows = [{"prompt": f"what is {NUMBERS[n]} plus {NUMBERS[n + 2]} ?"} for n in range(4)]
    return PPOTrainer(
        tiny_causal_lm("llama"), reward_funcs=id_reward, args=args, processing_class=word_tokenizer(),
        train_dataset=datasets.Dataset.from_list(rows), rollout_engine=FixedEngine(),
    )  # fmt: skip


def one_step(trainer) -> dict:
    """Train one step; the logged loss (averaged over processes by Trainer) and the updated weights."""
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    weights = {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    return {"loss": loss, "weights": weights}


# ------------------------------------------------------------------------------------------------ the worker


def fsdp2_sft_step(layout: str, sft: SFTTrainer) -> dict:
    """One SGD step of ``SFTTrainer.compute_loss`` on a model sharded as accelerate's FSDP2 plugin shards it
    (each decoder layer, then the root: embeddings, final norm and lm_head live in the root's group); this
    rank trains on its half of the global batch."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    model = tiny_causal_lm(layout)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert type(model.lm_head.weight).__name__ == "DTensor"  # sharded outside the forward
    rows = [sft.train_dataset[i] for i in range(GLOBAL_BATCH)]
    per_rank = GLOBAL_BATCH // WORLD
    batch = sft.data_collator(rows[rank * per_rank : (rank + 1) * per_rank])
    global_tokens = sum((sft.data_collator([row])["labels"][:, 1:] != -100).sum() for row in rows)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss = sft.compute_loss(model, batch, num_items_in_batch=global_tokens)
    loss.backward()
    optimizer.step()
    reported = loss.detach().clone()
    dist.all_reduce(reported)  # Trainer logs the mean over processes of compute_loss
    weights = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    return {"loss": float(reported) / WORLD, "weights": weights}


def fsdp2_sharded_head_grads() -> dict:
    """The fused cross-entropy in the forward of an FSDP2-sharded head ``[31, 16]`` (uneven: 16 + 15 rows); each
    rank feeds its own hidden states. Returns this rank's data, its gradient shard and the shard's row offset."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from fastalign import linear_cross_entropy

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 31, bias=False)

        def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return linear_cross_entropy(hidden, self.proj.weight, targets, reduction="sum")

    rank = dist.get_rank()
    torch.manual_seed(0)
    head = Head()
    full_weight = head.proj.weight.detach().clone()
    fully_shard(head)
    generator = torch.Generator().manual_seed(100 + rank)
    hidden = torch.randn(3, 5, 16, generator=generator)
    targets = torch.randint(0, 31, (3, 5), generator=generator)
    targets[0, :2] = -100
    (head(hidden, targets) * WORLD).backward()  # FSDP averages the shards' gradients: x WORLD gives the sum
    grad = head.proj.weight.grad
    offset = 16 * rank  # torch.chunk(31 rows, 2): rows 0-15 on rank 0, 16-30 on rank 1
    return {"hidden": hidden, "targets": targets, "weight": full_weight, "placements": str(grad.placements),
            "grad_shard": grad.to_local().clone(), "offset": offset}  # fmt: skip


def fsdp2_grpo_step(case: str, out: Path) -> dict:
    """One SGD step of ``GRPOTrainer.compute_loss`` on an FSDP2-sharded policy; this rank trains on its own
    prompt's rollout (prepared by the trainer: old log-probs, advantages, token counts summed over the ranks).
    Also the old log-probs recomputed through the sharded root, without gradient."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    grpo = grpo_trainer(case, out, WORLD)
    inputs = grpo._prepare_inputs(next(iter(grpo.get_train_dataloader())))
    model = tiny_causal_lm("llama")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    # Before any forward, as Trainer does: the root stays unsharded after its forward, and parameters() would then
    # list the gathered copies instead of the sharded parameters.
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    old_logps = grpo._completion_logps(model, inputs)
    loss = grpo.compute_loss(model, inputs)
    loss.backward()
    optimizer.step()
    reported = loss.detach().clone()
    dist.all_reduce(reported)
    weights = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    return {"loss": float(reported) / WORLD, "weights": weights, "old_logps": old_logps,
            "expected_old_logps": inputs.old_logps}  # fmt: skip


def fsdp2_generation() -> dict:
    """HFGenerateEngine on an FSDP2-sharded model with this rank's own prompt and length limit (rank 0 generates
    up to 8 tokens, rank 1 up to 3): the trainers' check turns on generate's synchronised stepping, and the
    completions are those of the unsharded model with the same seed. PPO's case (generating with a module inside
    the sharded root) is refused."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from fastalign.rollout import HFGenerateEngine, SamplingParams
    from fastalign.trainers.online import check_generation_under_fsdp2

    rank = dist.get_rank()
    prompts = [[2, 11, 12, 13, 5]] if rank == 0 else [[2, 20, 21]]
    params = SamplingParams(num_generations=2, max_completion_length=8 if rank == 0 else 3, temperature=1.0)
    expected = HFGenerateEngine(tiny_causal_lm("llama"), pad_token_id=0, eos_token_id=EOS).generate(
        prompts, params, seed=rank
    )
    model = tiny_causal_lm("llama")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        check_generation_under_fsdp2(model.model, model)
        refusal = ""
    except ValueError as error:
        refusal = str(error)
    check_generation_under_fsdp2(model, model)
    got = HFGenerateEngine(model, pad_token_id=0, eos_token_id=EOS).generate(prompts, params, seed=rank)
    return {"expected": expected.completion_ids, "got": got.completion_ids, "refusal": refusal}


def worker(out: Path) -> None:
    import torch.distributed as dist

    results: dict = {}
    for layout in ("llama", "qwen2"):
        sft = sft_trainer(layout, out / f"sft-{layout}", WORLD)
        results[f"ddp-sft-{layout}"] = one_step(sft)
        results[f"ddp-sft-{layout}"]["wrapper"] = type(sft.model_wrapped).__name__
        results[f"fsdp2-sft-{layout}"] = fsdp2_sft_step(layout, sft)
    results["ddp-dpo-llama"] = one_step(dpo_trainer(out / "dpo", WORLD))
    results["ddp-reward"] = one_step(reward_trainer(out / "reward", WORLD))
    for case in GRPO_CASES:
        grpo = grpo_trainer(case, out / f"grpo-{case}", WORLD)
        results[f"ddp-grpo-{case}"] = one_step(grpo)
        results[f"ddp-grpo-{case}"]["wrapper"] = type(grpo.model_wrapped).__name__
    for case in ("dapo", "bnpo"):
        results[f"fsdp2-grpo-{case}"] = fsdp2_grpo_step(case, out / f"fsdp2-grpo-{case}")
    results["fsdp2-generation"] = fsdp2_generation()
    ppo = ppo_trainer(out / "ppo", WORLD)
    results["ddp-ppo"] = one_step(ppo)
    results["ddp-ppo"]["wrapper"] = type(ppo.model_wrapped).__name__
    results["fsdp2-head"] = fsdp2_sharded_head_grads()
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()


# ------------------------------------------------------------------------------------------------- the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> list[dict]:
    """Every case, run once under ``accelerate launch`` with 2 processes: the results of rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("distributed")
    config = out / "ddp.yaml"
    config.write_text(ACCELERATE_CONFIG)
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", str(WORLD),
               "--main_process_port", str(free_port()), __file__, str(out)]  # fmt: skip
    # The worker imports helpers.*: tests/ on its path, as pytest has it (pyproject.toml: pythonpath).
    tests = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([tests, os.environ["PYTHONPATH"]]) if os.environ.get("PYTHONPATH") else tests
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The same steps in this (single) process, on the whole global batch."""
    out = tmp_path_factory.mktemp("single")
    return {
        "sft-llama": one_step(sft_trainer("llama", out / "sft-llama", 1)),
        "sft-qwen2": one_step(sft_trainer("qwen2", out / "sft-qwen2", 1)),
        "dpo-llama": one_step(dpo_trainer(out / "dpo", 1)),
        "reward": one_step(reward_trainer(out / "reward", 1)),
        **{f"grpo-{case}": one_step(grpo_trainer(case, out / f"grpo-{case}", 1)) for case in GRPO_CASES},
        "ppo": one_step(ppo_trainer(out / "ppo", 1)),
    }


def assert_same_step(got: dict, expected: dict, initial: dict, head: str = "lm_head.weight") -> None:
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-7)
    assert got["weights"].keys() == expected["weights"].keys()
    for name, weight in expected["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, **TOLERANCE, msg=name)
    # The comparison can fail: the step moved the head (lm_head, score head) far beyond the tolerance.
    moved = (expected["weights"][head] - initial[head]).abs().max()
    assert moved > 100 * TOLERANCE["atol"]


@pytest.mark.parametrize("layout", ["llama", "qwen2"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_sft_step_equals_the_single_process_step(distributed, single, strategy, layout):
    """Loss and updated weights of one SFT step on 2 processes (2 rows each) equal one process on the 4 rows:
    the gradients are synchronised and scaled to the global token mean (tied Qwen2 and untied Llama)."""
    got = distributed[0][f"{strategy}-sft-{layout}"]
    assert_same_step(got, single[f"sft-{layout}"], tiny_causal_lm(layout).state_dict())
    for name, weight in distributed[1][f"{strategy}-sft-{layout}"]["weights"].items():
        torch.testing.assert_close(weight, got["weights"][name], rtol=0, atol=0, msg=name)  # ranks agree
    if strategy == "ddp":
        assert got["wrapper"] == "DistributedDataParallel"  # the trainer really ran wrapped


def test_dpo_step_under_ddp_equals_the_single_process_step(distributed, single):
    assert_same_step(distributed[0]["ddp-dpo-llama"], single["dpo-llama"], tiny_causal_lm("llama").state_dict())


def test_reward_step_under_ddp_equals_the_single_process_step(distributed, single):
    """The reward model's own forward runs through DDP; its mean over pairs (with the centring term) per process
    averages to the mean over the global batch."""
    assert_same_step(distributed[0]["ddp-reward"], single["reward"], tiny_reward_model("llama").state_dict(),
                     head="score.weight")  # fmt: skip


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_step_under_ddp_equals_the_single_process_step(distributed, single, case):
    """Each process rolls out one of the two prompts (different token counts); the step equals one process on
    both: the policy loss runs through the DDP wrapper and is normalised by the global counts (dapo: the
    generation batch's tokens, bnpo: the micro-batch's; grpo, dr_grpo: per row), batch-scaled rewards use the
    std of both processes' rewards, and with accumulation (2 micro-batches) the reference's KL term is in."""
    got = distributed[0][f"ddp-grpo-{case}"]
    assert got["wrapper"] == "DistributedDataParallel"
    assert_same_step(got, single[f"grpo-{case}"], tiny_causal_lm("llama").state_dict())
    for name, weight in distributed[1][f"ddp-grpo-{case}"]["weights"].items():
        torch.testing.assert_close(weight, got["weights"][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", ["dapo", "bnpo"])
def test_grpo_loss_under_fsdp2_equals_the_single_process_step(distributed, single, case):
    """``GRPOTrainer.compute_loss`` on the sharded policy (lm_head gathered in the root's forward) trains as
    one process on both prompts; the no-gradient old log-probs through the sharded root equal the plain ones."""
    for rank_results in distributed:
        got = rank_results[f"fsdp2-grpo-{case}"]
        mask = got["expected_old_logps"] != 0
        assert mask.any()
        torch.testing.assert_close(got["old_logps"], got["expected_old_logps"], rtol=1e-5, atol=1e-5)
    assert_same_step(distributed[0][f"fsdp2-grpo-{case}"], single[f"grpo-{case}"], tiny_causal_lm("llama").state_dict())


def test_generation_on_an_fsdp2_model(distributed):
    """Ranks with different lengths generate on the sharded root in step (no hang) and get the unsharded
    model's completions; a module inside the sharded root is refused with a message that says why."""
    widths = []
    for result in (rank_results["fsdp2-generation"] for rank_results in distributed):
        torch.testing.assert_close(result["got"], result["expected"], rtol=0, atol=0)
        widths.append(result["got"].shape[1])
        assert "FSDP2-sharded" in result["refusal"] and "rollout_engine" in result["refusal"]
    assert widths[0] != widths[1]  # the ranks really stopped at different lengths


def test_ppo_step_under_ddp_equals_the_single_process_step(distributed, single):
    """Untied Llama policy + value model in one DDP-wrapped module: the clipped policy loss on the lm_head and
    the value loss run inside its forward; advantages are whitened over both processes' rollouts and the token
    means use the global micro-batch token count."""
    got = distributed[0]["ddp-ppo"]
    assert got["wrapper"] == "DistributedDataParallel"
    initial = {f"policy.{k}": v for k, v in tiny_causal_lm("llama").state_dict().items()}
    assert_same_step(got, single["ppo"], initial, head="policy.lm_head.weight")


def test_fused_loss_gradients_land_on_the_lm_head_shards(distributed):
    """Under FSDP2 each rank holds rows ``[offset, offset + rows)`` of the lm_head gradient, and they are the
    rows of the gradient of the summed loss over both ranks' data, computed eagerly from full logits."""
    results = [rank_results["fsdp2-head"] for rank_results in distributed]
    weight = results[0]["weight"].requires_grad_()
    total = 0.0
    for result in results:
        logits = result["hidden"] @ weight.T
        total = total + torch.nn.functional.cross_entropy(
            logits.reshape(-1, 31), result["targets"].reshape(-1), ignore_index=-100, reduction="sum"
        )
    (expected,) = torch.autograd.grad(total, weight)
    for rank, result in enumerate(results):
        assert result["placements"] == "(Shard(dim=0),)"
        rows = 16 if rank == 0 else 15
        assert result["grad_shard"].shape == (rows, 16)
        offset = result["offset"]
        torch.testing.assert_close(result["grad_shard"], expected[offset : offset + rows], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
