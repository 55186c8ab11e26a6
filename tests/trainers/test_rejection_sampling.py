"""Rejection sampling (fastalign.sampling) on a tiny random-init model with a deterministic toy reward: best-of-k
keeps each prompt's argmax, the threshold keeps only passing rows, conversational prompts give conversational
completions, the JSONL it writes is SFT data, and mixing gives the requested fraction."""

import json
import math

import datasets
import pytest
import torch
from helpers.tiny import NUMBERS, tiny_causal_lm, word_tokenizer

from fastalign.data import load_training_dataset
from fastalign.rewards import completion_texts
from fastalign.rollout import HFGenerateEngine, RolloutBatch, SamplingParams
from fastalign.sampling import mix_datasets, rejection_sample, save_jsonl
from fastalign.trainers import SFTConfig, prepare_sft_dataset

FAVOURITES = ("blue", "sky", "good")


def favourite_words(completions, **kwargs):
    """The number of "blue", "sky" and "good" words: deterministic, and it varies between samples."""
    return [float(sum(text.split().count(w) for w in FAVOURITES)) for text in completion_texts(completions)]


def standard_rows(n=6):
    return [{"prompt": f"what is {NUMBERS[i]} plus one ?", "number": i} for i in range(n)]


def conversational_rows(n=4):
    return [
        {"prompt": [{"role": "user", "content": f"what is {NUMBERS[i]} plus one ?"}], "number": i} for i in range(n)
    ]


class Recorder:
    """HFGenerateEngine that keeps every batch it returns, to re-score all k completions in the tests."""

    def __init__(self, model, tokenizer):
        self.engine = HFGenerateEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        self.batches = []

    def generate(self, prompts, params, seed=None):
        batch = self.engine.generate(prompts, params, seed=seed)
        self.batches.append(batch)
        return batch

    def texts(self, tokenizer):
        return [
            tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
            for batch in self.batches
            for ids, mask in zip(batch.completion_ids, batch.completion_mask, strict=True)
        ]


def sample(rows, k=6, engine=None, model=None, tokenizer=None, **options):
    model = model or tiny_causal_lm()
    tokenizer = tokenizer or word_tokenizer()
    params = SamplingParams(num_generations=k, max_completion_length=8)
    options = {"batch_size": 4, "seed": 0, "progress": False, **options}
    dataset = datasets.Dataset.from_list(rows)
    return rejection_sample(model, tokenizer, dataset, favourite_words, params=params, engine=engine, **options)


def test_best_of_k_keeps_each_prompts_argmax():
    model, tokenizer = tiny_causal_lm(), word_tokenizer()
    recorder = Recorder(model, tokenizer)
    rows = standard_rows()
    out = sample(rows, k=6, engine=recorder, model=model, tokenizer=tokenizer)
    assert len(out) == len(rows)
    assert out["prompt"] == [row["prompt"] for row in rows] and out["number"] == list(range(len(rows)))
    scores = favourite_words(recorder.texts(tokenizer))  # every completion sampled, re-scored here
    assert len(scores) == 6 * len(rows)
    groups = [scores[p * 6 : (p + 1) * 6] for p in range(len(rows))]
    assert any(len(set(group)) > 1 for group in groups), "the toy reward must tell the samples apart"
    texts = recorder.texts(tokenizer)
    for p, row in enumerate(out):
        assert row["reward"] == max(groups[p])
        assert favourite_words([row["completion"]]) == [max(groups[p])]
        first_best = texts[p * 6 + groups[p].index(max(groups[p]))]
        assert row["completion"].strip() == first_best.strip()  # ties go to the first sample


def test_the_same_seed_gives_the_same_rows():
    first, again = sample(standard_rows()), sample(standard_rows())
    assert first.to_list() == again.to_list()


def test_threshold_keeps_every_passing_completion_and_only_those():
    model, tokenizer = tiny_causal_lm(), word_tokenizer()
    recorder = Recorder(model, tokenizer)
    out = sample(
        standard_rows(),
        engine=recorder,
        model=model,
        tokenizer=tokenizer,
        keep="threshold",
        threshold=1.0,
        deduplicate=False,
    )
    scores = favourite_words(recorder.texts(tokenizer))
    assert 0 < len(out) == sum(s >= 1.0 for s in scores) < len(scores)
    assert all(r >= 1.0 for r in out["reward"])
    assert favourite_words(out["completion"]) == out["reward"]


def test_best_with_a_threshold_drops_prompts_whose_best_fails():
    best = sample(standard_rows())
    passing = sample(standard_rows(), threshold=2.0)
    assert passing.to_list() == [row for row in best.to_list() if row["reward"] >= 2.0]
    assert 0 < len(passing) < len(best)


def test_conversational_prompts_give_conversational_completions():
    out = sample(conversational_rows())
    assert len(out) == 4
    for row, source in zip(out, conversational_rows(), strict=True):
        assert row["prompt"] == source["prompt"]
        assert len(row["completion"]) == 1 and row["completion"][0]["role"] == "assistant"
        assert isinstance(row["completion"][0]["content"], str)
        assert favourite_words([row["completion"]]) == [row["reward"]]


@pytest.mark.parametrize("rows", [standard_rows, conversational_rows])
def test_the_written_jsonl_is_prompt_completion_sft_data(tmp_path, rows):
    tokenizer = word_tokenizer()
    out = sample(rows(), tokenizer=tokenizer)
    path = save_jsonl(out, tmp_path / "sub" / "sampled.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == len(out) and json.loads(lines[0]).keys() >= {"prompt", "completion", "reward", "number"}
    loaded = load_training_dataset(str(path))
    tokenized = prepare_sft_dataset(loaded, tokenizer, SFTConfig(output_dir=str(tmp_path / "o"), max_length=64))
    assert len(tokenized) == len(out)
    for row in tokenized:
        assert tokenizer.unk_token_id not in row["input_ids"]  # the completion text continues the prompt cleanly
        assert row["completion_mask"][0] == 0 and row["completion_mask"][-1] == 1


class FixedEngine:
    """Returns given completions (token ids) for every prompt: the candidates are known exactly."""

    def __init__(self, completions, eos):
        self.completions, self.eos = completions, eos

    def generate(self, prompts, params):
        assert params.num_generations == len(self.completions)
        width = max(len(c) for c in self.completions)
        ids = torch.zeros((len(prompts) * len(self.completions), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        truncated = []
        for p in range(len(prompts)):
            for j, completion in enumerate(self.completions):
                row = p * len(self.completions) + j
                ids[row, : len(completion)] = torch.tensor(completion)
                mask[row, : len(completion)] = 1
                truncated.append(completion[-1] != self.eos)
        prompt_ids = torch.ones((ids.shape[0], 1), dtype=torch.long)
        return RolloutBatch(prompt_ids, torch.ones_like(prompt_ids), ids, mask, torch.tensor(truncated))


def test_unscorable_and_truncated_completions_are_not_kept():
    tokenizer = word_tokenizer()
    blue, sky, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("blue", "sky", "</s>"))

    def only_short(completions, completion_ids, **kwargs):  # None (not applicable) beyond 2 tokens
        return [2.0 * len(ids) if len(ids) <= 2 else None for ids in completion_ids]

    engine = FixedEngine([[blue, blue, blue], [sky, eos], [blue, sky, sky, sky]], eos)
    params = SamplingParams(num_generations=3, max_completion_length=4)
    dataset = datasets.Dataset.from_list(standard_rows(2))
    out = rejection_sample(None, tokenizer, dataset, only_short, params=params, engine=engine, progress=False)
    assert out["completion"] == [" sky", " sky"] and out["reward"] == [4.0, 4.0]  # the others are unscorable
    out = rejection_sample(None, tokenizer, dataset, [favourite_words], params=params, engine=engine, progress=False)
    assert out["reward"] == [4.0, 4.0]  # " blue sky sky sky", truncated but kept by default
    out = rejection_sample(
        None, tokenizer, dataset, [favourite_words], params=params, engine=engine, skip_truncated=True, progress=False
    )
    assert out["completion"] == [" sky", " sky"] and out["reward"] == [1.0, 1.0]
    weighted = rejection_sample(
        None,
        tokenizer,
        dataset,
        [favourite_words, only_short],
        [0.5, 1.0],
        params=params,
        engine=engine,
        progress=False,
    )
    # NaN-aware weighted sums: 0.5 * 3 (+ None), 0.5 * 1 + 4, 0.5 * 4 (+ None)
    assert weighted["completion"] == [" sky", " sky"] and weighted["reward"] == [4.5, 4.5]


def test_threshold_deduplicates_identical_completions_unless_asked_not_to():
    tokenizer = word_tokenizer()
    blue, eos = tokenizer.convert_tokens_to_ids("blue"), tokenizer.eos_token_id
    engine = FixedEngine([[blue, eos], [blue, eos], [blue, blue, eos]], eos)
    params = SamplingParams(num_generations=3, max_completion_length=4)
    dataset = datasets.Dataset.from_list(standard_rows(1))
    options = {"params": params, "engine": engine, "keep": "threshold", "threshold": 1.0, "progress": False}
    assert rejection_sample(None, tokenizer, dataset, favourite_words, **options)["reward"] == [1.0, 2.0]
    again = rejection_sample(None, tokenizer, dataset, favourite_words, deduplicate=False, **options)
    assert again["reward"] == [1.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep": "threshold"}, "needs a threshold"),
        ({"keep": "worst"}, "keep must be one of"),
        ({"keep": "threshold", "threshold": math.nan}, "threshold must be None or a finite number"),
        ({"threshold": "1"}, "threshold must be None or a finite number"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
    ],
)
def test_bad_keep_threshold_and_batch_options_are_refused(options, message):
    dataset = datasets.Dataset.from_list(standard_rows(1))
    with pytest.raises(ValueError, match=message):
        rejection_sample(None, word_tokenizer(), dataset, favourite_words, params=SamplingParams(), **options)


def test_bad_datasets_and_weights_are_refused():
    tokenizer, params = word_tokenizer(), SamplingParams()
    with pytest.raises(ValueError, match="missing column 'prompt'"):
        rejection_sample(None, tokenizer, datasets.Dataset.from_list([{"text": "x"}]), favourite_words, params=params)
    with pytest.raises(ValueError, match="reward_weights has 2 weights for 1 reward functions"):
        rejection_sample(
            None, tokenizer, datasets.Dataset.from_list(standard_rows(1)), favourite_words, [1.0, 2.0], params=params
        )
    with pytest.raises(ValueError, match="reward_funcs is empty"):
        rejection_sample(None, tokenizer, datasets.Dataset.from_list(standard_rows(1)), [], params=params)
    with pytest.warns(DeprecationWarning, match="reward_weights"), pytest.raises(ValueError, match="has 2 weights"):
        rejection_sample(
            None,
            tokenizer,
            datasets.Dataset.from_list(standard_rows(1)),
            favourite_words,
            weights=[1.0, 2.0],
            params=params,
        )


def sampled_like(n, conversational=False):
    def prompt(i):
        return [{"role": "user", "content": f"q{i}"}] if conversational else f"q{i}"

    def completion(i):
        return [{"role": "assistant", "content": f"a{i}"}] if conversational else f" a{i}"

    return datasets.Dataset.from_list(
        [{"prompt": prompt(i), "completion": completion(i), "reward": 1.0} for i in range(n)]
    )


@pytest.mark.parametrize(("n", "ratio"), [(30, 0.25), (12, 0.5), (10, 0.1)])
def test_mixing_gives_the_requested_fraction(n, ratio):
    mix = datasets.Dataset.from_list(
        [{"prompt": f"m{i}", "completion": f" b{i}", "source": "chat"} for i in range(100)]
    )
    out = mix_datasets(sampled_like(n), mix, ratio, seed=3)
    from_mix = [row for row in out if row["source"] == "chat"]
    assert len(from_mix) / len(out) == pytest.approx(ratio, abs=0.5 / len(out))
    assert len(out) - len(from_mix) == n and len({row["prompt"] for row in from_mix}) == len(from_mix)
    assert all(row["reward"] is None for row in from_mix) and all(row["source"] is None for row in out if row["reward"])
    assert mix_datasets(sampled_like(n), mix, ratio, seed=3).to_list() == out.to_list()
    assert mix_datasets(sampled_like(n), mix, ratio, seed=4).to_list() != out.to_list()
    assert mix_datasets(sampled_like(n), mix, 0.0).to_list() == sampled_like(n).to_list()


def test_mixing_messages_into_conversational_data_and_oversampling():
    chat = [
        {"messages": [{"role": "user", "content": f"m{i}"}, {"role": "assistant", "content": f"b{i}"}]}
        for i in range(3)
    ]
    with pytest.warns(UserWarning, match="rows are repeated"):
        out = mix_datasets(sampled_like(6, conversational=True), datasets.Dataset.from_list(chat), 0.5)
    assert len(out) == 12 and set(out.column_names) == {"prompt", "completion", "reward"}
    mixed = [row for row in out if row["reward"] is None]
    assert len(mixed) == 6 and all(row["completion"][0]["role"] == "assistant" for row in mixed)
    tokenized = prepare_sft_dataset(out, word_tokenizer(), SFTConfig(output_dir="unused", max_length=64))
    assert len(tokenized) == 12


def test_mixing_refuses_other_formats_styles_and_ratios():
    standard = sampled_like(4)
    conversational_mix = sampled_like(4, conversational=True)
    with pytest.raises(ValueError, match="the sampled data is standard but the mix dataset is conversational"):
        mix_datasets(standard, conversational_mix, 0.5)
    with pytest.raises(ValueError, match="must hold prompt \\+ completion rows"):
        mix_datasets(standard, datasets.Dataset.from_list([{"text": "x"}]), 0.5)
    for ratio in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match=r"in \[0, 1\)"):
            mix_datasets(standard, standard, ratio)
