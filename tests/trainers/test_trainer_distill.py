"""DistillTrainer on a tiny student and a wider teacher: one step equals the float64 divergence of both models'
full logits, a random student learns the teacher's answers, ``lmbda`` mixes on- and off-policy batches
reproducibly (and a resumed run is exact), the teacher stays frozen, and teachers or datasets it cannot use are
refused with the reason."""

import datasets
import pytest
import torch
from helpers.distill_reference import reference_distill
from helpers.tiny import addition_rows, assert_resume_is_exact, tiny_causal_lm, word_tokenizer
from helpers.trainer_distill import VOCAB, config, small_student, trainer
from transformers import PreTrainedTokenizerFast

from fastalign.data import tokenize_sft
from fastalign.trainers.configs import DistillConfig
from fastalign.trainers.distill import DistillTrainer


def full_logits_divergence(student, teacher, batch, *, beta, temperature):
    """The generation batch's token mean of the divergence from both models' full logits, in float64."""
    completion = batch.completion_ids.shape[1]
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
    student_hidden = student.model(**inputs).last_hidden_state[:, -completion - 1 : -1]
    with torch.no_grad():
        teacher_hidden = teacher.model(**inputs).last_hidden_state[:, -completion - 1 : -1]
    targets = batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)
    summed = reference_distill(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student.lm_head.weight,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        teacher.lm_head.weight,
        targets.reshape(-1),
        beta=beta,
        temperature=temperature,
        reduction="sum",
    )
    return summed / batch.generation_tokens.double()


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
@pytest.mark.parametrize(("beta", "temperature"), [(0.5, 2.0), (0.0, 1.0), (1.0, 0.7)])
def test_one_step_equals_the_float64_divergence_of_the_full_logits(tmp_path, lmbda, beta, temperature):
    """Off- and on-policy micro-batches: the fused loss and the student's gradients equal the formula on both
    models' full logits (a token mean over the generation batch of 2 micro-batches); the teacher gets none."""
    distill = trainer(
        tmp_path, lmbda=lmbda, beta=beta, temperature=temperature, gradient_accumulation_steps=2, max_steps=1
    )
    batch = distill._prepare_inputs(next(iter(distill.get_train_dataloader())))
    assert float(batch.on_policy) == lmbda
    student, teacher = distill.model, distill.teacher_model
    fused = distill.compute_loss(student, batch)
    fused.backward()
    fused_grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    expected = full_logits_divergence(student, teacher, batch, beta=beta, temperature=temperature)
    expected.backward()
    # float32 ops against a float64 formula on float32 hidden states: one step's loss and gradients
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-7)
    for name, p in student.named_parameters():
        error = (fused_grads[name] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-8)
        assert error < 1e-4, f"{name}: relative error {error:.2e}"
    assert all(p.grad is None for p in teacher.parameters())


def _fit(model, rows, tokenizer, steps=150, lr=1e-2):
    """Plain full-batch SFT of ``model`` on ``rows`` (the teacher of the learning test)."""
    encoded = [tokenize_sft(row, tokenizer) for row in rows]
    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in encoded])
    labels = torch.tensor(
        [
            [t if m else -100 for t, m in zip(e["input_ids"], e["completion_mask"], strict=True)]
            + [-100] * (width - len(e["input_ids"]))
            for e in encoded
        ]
    )
    attention = (labels != -100) | (torch.arange(width) < torch.tensor([len(e["input_ids"]) for e in encoded])[:, None])
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=attention.long(), labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model


def answer_accuracy(model, rows, tokenizer) -> float:
    """The share of rows whose greedy continuation starts with the completion's first word."""
    correct = 0
    for row in rows:
        prompt = tokenizer(row["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += text.split()[:1] == row["completion"].split()[:1]
    return correct / len(rows)


def test_a_random_student_learns_the_teachers_answers(tmp_path):
    """A 16-wide student distilled (half the batches its own samples) from a 32-wide teacher fitted to the toy
    task answers what the teacher answers; the divergence falls and the teacher does not move."""
    tokenizer, rows = word_tokenizer(), addition_rows()
    teacher = _fit(tiny_causal_lm(), rows, tokenizer)
    assert answer_accuracy(teacher, rows, tokenizer) == 1.0
    student = small_student()
    before = answer_accuracy(student, rows, tokenizer)
    teacher_state = {name: p.clone() for name, p in teacher.state_dict().items()}
    distill = trainer(
        tmp_path, student=student, teacher=teacher, lmbda=0.5, beta=0.5, max_steps=200, learning_rate=2e-2,
        per_device_train_batch_size=9, logging_steps=10,
    )  # fmt: skip
    distill.train()
    logged = [entry for entry in distill.state.log_history if "divergence" in entry]
    assert 0 < sum(e["on_policy"] for e in logged) / len(logged) < 1  # both kinds of batch were trained on
    assert logged[-1]["divergence"] < 0.05 * logged[0]["divergence"]
    after = answer_accuracy(distill.model, rows, tokenizer)
    assert before <= 0.3 and after >= 0.8, (before, after)
    for name, value in distill.teacher_model.state_dict().items():
        torch.testing.assert_close(value, teacher_state[name], rtol=0, atol=0, msg=name)


def test_lmbda_draws_are_seeded_by_the_step_and_off_policy_batches_are_the_datasets(tmp_path):
    distill = trainer(tmp_path, lmbda=0.5)
    draws = []
    for step in range(40):
        distill.state.global_step = step
        draws.append(distill._is_on_policy("train"))
    assert 10 < sum(draws) < 30
    again = trainer(tmp_path / "again", lmbda=0.5)
    redrawn = []
    for step in range(40):
        again.state.global_step = step
        redrawn.append(again._is_on_policy("train"))
    assert redrawn == draws
    other_seed = trainer(tmp_path / "seed", lmbda=0.5, seed=1)
    other = []
    for step in range(40):
        other_seed.state.global_step = step
        other.append(other_seed._is_on_policy("train"))
    assert other != draws
    assert distill._is_on_policy("eval")  # evaluation samples unless lmbda is 0

    off = trainer(tmp_path / "off", lmbda=0.0, per_device_train_batch_size=3)
    rows = next(iter(off.get_train_dataloader()))
    batch = off._prepare_inputs(rows)
    tokenizer = off.processing_class
    pairs = []  # the micro-batch's rows are shuffled: compare as a set
    for ids, mask, completion, completion_mask in zip(
        batch.input_ids, batch.attention_mask, batch.completion_ids, batch.completion_mask, strict=True
    ):
        prompt = ids[: -completion.shape[0]][mask[: -completion.shape[0]].bool()]
        assert completion[completion_mask.bool()][-1] == tokenizer.eos_token_id
        pairs.append(
            (tokenizer.decode(prompt, skip_special_tokens=True), tokenizer.decode(completion[completion_mask.bool()]))
        )
    expected = [(row["prompt"], f"{row['completion'].strip()} </s>") for row in rows]
    assert sorted(pairs) == sorted(expected)


def test_on_policy_only_reads_prompts_and_a_resumed_run_is_exact(tmp_path):
    prompts = [{"prompt": row["prompt"]} for row in addition_rows()]
    distill = trainer(tmp_path, rows=prompts, lmbda=1.0, max_steps=2)
    distill.train()
    assert [e["on_policy"] for e in distill.state.log_history if "on_policy" in e] == [1.0, 1.0]

    def make(folder, **overrides):  # on- and off-policy steps on both sides of the checkpoint
        return trainer(folder, lmbda=0.5, learning_rate=1e-2, **overrides)

    assert_resume_is_exact(make, tmp_path / "resume")


def test_refuses_what_it_cannot_distil(tmp_path):
    prompts = datasets.Dataset.from_list([{"prompt": row["prompt"]} for row in addition_rows()])
    with pytest.raises(ValueError, match=r"lmbda=0.5 draws off-policy batches .* no 'completion' column"):
        DistillTrainer(small_student(), tiny_causal_lm(), config(tmp_path, lmbda=0.5), prompts, None, word_tokenizer())
    with pytest.raises(ValueError, match=f"teacher's lm_head has {VOCAB + 3} rows and the student's {VOCAB}"):
        trainer(tmp_path, teacher=tiny_causal_lm(vocab_size=VOCAB + 3))
    renamed = word_tokenizer().get_vocab()
    renamed["sky"], renamed["blue"] = renamed["blue"], renamed["sky"]
    from tokenizers import Tokenizer, models

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=renamed, unk_token="<unk>")))
    with pytest.raises(
        ValueError, match=r"tokenizer differs from the student's in 2 tokens .*'blue': 29 vs 28; 'sky': 28 vs 29"
    ):
        DistillTrainer(
            small_student(), tiny_causal_lm(), config(tmp_path), datasets.Dataset.from_list(addition_rows()),
            processing_class=word_tokenizer(), teacher_processing_class=other,
        )  # fmt: skip
    capped = tiny_causal_lm()
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="the teacher softcaps its logits"):
        trainer(tmp_path, teacher=capped)
    with pytest.raises(ValueError, match="no teacher"):
        DistillTrainer(
            small_student(), args=config(tmp_path), train_dataset=datasets.Dataset.from_list(addition_rows())
        )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lmbda", 1.5, "lmbda"),
        ("beta", -0.1, "beta"),
        ("temperature", 0.0, "temperature"),
        ("backend", "cuda", "torch and Triton kernels only"),
        ("remove_unused_columns", True, "reads the prompt and completion columns"),
    ],
)
def test_config_refuses_values_it_cannot_honour(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(output_dir=str(tmp_path), use_cpu=True, **{field: value})


class RecordingEngine:
    """Wraps the trainer's engine; records the prompts and sampling settings of each generate call."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return self.engine.generate(prompts, params)

    def sync_weights(self, model):
        self.engine.sync_weights(model)


def test_sampling_fields_reach_the_engine_and_length_limits_cut_the_dataset_rows(tmp_path):
    sampling = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2}
    distill = trainer(tmp_path, lmbda=1.0, max_prompt_length=3, max_completion_length=4, **sampling)
    distill.engine = RecordingEngine(distill.engine)
    distill._prepare_inputs(next(iter(distill.get_train_dataloader())))
    ((prompts, params),) = distill.engine.calls
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.7, 0.9, 5, 0.05)
    assert (params.repetition_penalty, params.max_completion_length, params.num_generations) == (1.2, 4, 1)
    assert all(len(prompt) == 3 for prompt in prompts)  # each prompt's last max_prompt_length tokens
    off = trainer(tmp_path / "off", lmbda=0.0, max_prompt_length=3, max_completion_length=2)
    batch = off._prepare_inputs(next(iter(off.get_train_dataloader())))
    assert batch.completion_ids.shape[1] == 2 and batch.attention_mask[:, :-2].sum(dim=1).eq(3).all()


def test_backend_reaches_the_fused_divergence(tmp_path, monkeypatch):
    import fastalign.ops.dispatch

    asked = []
    real = fastalign.ops.dispatch.resolve_backend

    def record(backend, *args, **kwargs):
        asked.append(backend)
        return real("torch", *args, **kwargs)

    monkeypatch.setattr(fastalign.ops.dispatch, "resolve_backend", record)
    distill = trainer(tmp_path, backend="triton")
    distill.compute_loss(distill.model, distill._prepare_inputs(next(iter(distill.get_train_dataloader()))))
    assert asked == ["triton"]


@pytest.mark.parametrize("value", [False, True])
def test_disable_dropout_is_the_students_and_the_teacher_never_drops(tmp_path, value):
    student, teacher = small_student(), tiny_causal_lm()
    for model in (student, teacher):
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
    distill = trainer(tmp_path, student=student, teacher=teacher, disable_dropout=value)
    assert {layer.self_attn.attention_dropout for layer in distill.model.model.layers} == {0.0 if value else 0.1}
    assert {layer.self_attn.attention_dropout for layer in distill.teacher_model.model.layers} == {0.0}


def test_log_completions_prints_prompts_completions_and_their_source(tmp_path, capsys):
    distill = trainer(tmp_path, lmbda=0.0, log_completions=True, num_completions_to_print=2, max_steps=1)
    distill.train()
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert [name.strip() for name in lines[header].split(" | ")] == ["step", "prompt", "completion", "on_policy"]
    rows = [line.split(" | ") for line in lines[header + 2 : header + 4]]
    completions = {row["completion"].strip() for row in addition_rows()}
    assert all(row[1].startswith("add one to") and row[2].strip() in completions for row in rows), rows
    assert all(row[3].strip() == "False" for row in rows)
    assert header + 4 == len(lines) or " | " not in lines[header + 4]  # num_completions_to_print rows


def test_the_teacher_loads_from_its_folder_with_its_tokenizer_checked(tmp_path, monkeypatch):
    import fastalign.trainers.distill as distill_module

    folder = tmp_path / "teacher"
    tiny_causal_lm().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    revisions = []
    real = distill_module.load_causal_lm

    def load(path, **kwargs):
        revisions.append(kwargs.get("revision"))
        return real(path, **kwargs)

    monkeypatch.setattr(distill_module, "load_causal_lm", load)
    rows = datasets.Dataset.from_list(addition_rows())
    args = config(tmp_path, teacher_model_name_or_path=str(folder), teacher_model_revision="main")
    distill = DistillTrainer(small_student(), args=args, train_dataset=rows, processing_class=word_tokenizer())
    assert revisions == ["main"] and distill.teacher_model.config.hidden_size == 32
    other = word_tokenizer()
    other.add_tokens(["extra"])
    other.save_pretrained(folder)
    with pytest.raises(ValueError, match="tokenizer differs from the student's in 1 tokens"):
        DistillTrainer(small_student(), args=args, train_dataset=rows, processing_class=word_tokenizer())


def test_lora_distillation_updates_only_the_students_adapters(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    distill = DistillTrainer(
        small_student(), tiny_causal_lm(), config(tmp_path, lmbda=0.5, max_steps=3),
        datasets.Dataset.from_list(addition_rows()), processing_class=word_tokenizer(), peft_config=lora,
    )  # fmt: skip
    before = {name: p.detach().clone() for name, p in distill.model.named_parameters()}
    teacher_before = {name: p.detach().clone() for name, p in distill.teacher_model.named_parameters()}
    distill.train()
    changed = {name for name, p in distill.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed), changed
    assert all(torch.equal(p, teacher_before[name]) for name, p in distill.teacher_model.named_parameters())


def test_evaluation_reports_the_divergence_of_the_students_samples(tmp_path):
    rows = datasets.Dataset.from_list(addition_rows())
    args = config(tmp_path, lmbda=0.5, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=3, max_steps=1)
    distill = DistillTrainer(small_student(), tiny_causal_lm(), args, rows, rows, word_tokenizer())
    distill.engine = RecordingEngine(distill.engine)
    assert distill.evaluate()["eval_loss"] > 0
    logged = distill.state.log_history[-1]  # the trainer's own metrics, as Trainer logs them
    assert logged["eval_divergence"] > 0 and logged["eval_on_policy"] == 1.0  # evaluation samples (lmbda > 0)
    # whole batches of 3 rows (the online trainers' sampler drops an incomplete last batch)
    assert [len(prompts) for prompts, _ in distill.engine.calls] == [3] * (len(rows) // 3)


def test_a_teachers_fixed_logit_divisor_is_applied(tmp_path):
    """A Granite-style ``logits_scaling`` divides the teacher's logits: the same loss as a teacher whose lm_head
    holds the divided weights (off-policy, so both see the same batch)."""
    scaled, halved = tiny_causal_lm(), tiny_causal_lm()
    scaled.config.logits_scaling = 2.0
    with torch.no_grad():
        halved.lm_head.weight.div_(2.0)
    losses = []
    for teacher in (scaled, halved):
        distill = trainer(tmp_path, teacher=teacher, lmbda=0.0, beta=0.5)
        batch = distill._prepare_inputs(next(iter(distill.get_train_dataloader())))
        losses.append(distill.compute_loss(distill.model, batch))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)
    unscaled = trainer(tmp_path, lmbda=0.0, beta=0.5)
    batch = unscaled._prepare_inputs(next(iter(unscaled.get_train_dataloader())))
    assert abs(unscaled.compute_loss(unscaled.model, batch) - losses[0]) > 1e-4  # the divisor matters here
