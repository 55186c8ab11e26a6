"""fastalign.data: loading, format detection, tokenization, packing and collators (CPU, no downloads)."""

from __future__ import annotations

import json
import random

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fastalign.data import (
    IGNORE_INDEX,
    PreferenceCollator,
    RewardCollator,
    SFTCollator,
    detect_format,
    extract_prompt,
    is_conversational,
    load_training_dataset,
    maybe_extract_prompt,
    pack_sequences,
    require_format,
    tokenize_dataset,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)

WORDS = [
    *("the", "sky", "is", "blue", "green", "red", "what", "color", "grass", "?", ".", ",", "hello", "hi", "there"),
    *("how", "are", "you", "i", "am", "fine", "thanks", "a", "an", "apple", "banana", "good", "bad", "tell", "me"),
    *("about", "say", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    assert len(set(WORDS)) == len(WORDS)
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


ROWS = {
    "language_modeling": [{"text": "the sky is blue ."}, {"text": "hello there ."}],
    "conversational_lm": [{"messages": user("hi") + assistant("hello there")}],
    "prompt_completion": [{"prompt": "the sky is", "completion": " blue ."}],
    "preference": [{"prompt": "the sky is", "chosen": " blue .", "rejected": " green ."}],
    "prompt_only": [{"prompt": "what color is the sky ?"}],
}


# ----------------------------------------------------------------------------------------------------- loading


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_jsonl_json_parquet(tmp_path):
    rows = ROWS["preference"] * 3
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows))
    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    for path in (jsonl, js, pq):
        ds = load_training_dataset(str(path))
        assert isinstance(ds, datasets.Dataset)
        assert ds.num_rows == 3 and set(ds.column_names) == {"prompt", "chosen", "rejected"}
        assert ds[0] == rows[0]
    assert load_training_dataset(jsonl, split="train[:2]").num_rows == 2


def test_load_folder(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", ROWS["language_modeling"])
    write_jsonl(folder / "sub" / "b.jsonl", ROWS["language_modeling"][:1])
    (folder / "README.md").write_text("not data")
    ds = load_training_dataset(folder)
    assert ds.num_rows == 3 and ds.column_names == ["text"]

    pq_folder = tmp_path / "pq"
    pq_folder.mkdir()
    datasets.Dataset.from_list(ROWS["prompt_only"]).to_parquet(str(pq_folder / "x.parquet"))
    assert load_training_dataset(pq_folder).column_names == ["prompt"]

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS["prompt_completion"]).save_to_disk(str(saved))
    assert load_training_dataset(saved).column_names == ["prompt", "completion"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_training_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="not a hub dataset id"):
        load_training_dataset("no/such/local/folder")
    with pytest.raises(FileNotFoundError, match=r"no \.json"):
        load_training_dataset(tmp_path)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", ROWS["language_modeling"])
    datasets.Dataset.from_list(ROWS["language_modeling"]).to_parquet(str(mixed / "b.parquet"))
    with pytest.raises(ValueError, match="mixes JSON and Parquet"):
        load_training_dataset(mixed)
    txt = tmp_path / "d.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_training_dataset(txt)


# ------------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_detect_format(fmt):
    ds = datasets.Dataset.from_list(ROWS[fmt])
    assert detect_format(ds) == fmt
    assert detect_format(ROWS[fmt][0]) == fmt
    assert detect_format(list(ROWS[fmt][0])) == fmt


def test_detect_format_implicit_prompt_and_extra_columns():
    assert detect_format(["chosen", "rejected"]) == "preference"
    assert detect_format(["prompt", "solution", "id"]) == "prompt_only"
    with pytest.raises(ValueError, match=r"columns \['question'\].*prompt_completion"):
        detect_format(["question"])


def test_require_format_errors_name_missing_columns():
    assert require_format(["prompt", "chosen", "rejected"], "dpo") == "preference"
    assert require_format(["messages"], "sft") == "conversational_lm"
    assert require_format(["prompt", "completion", "answer"], "grpo") == "prompt_only"
    with pytest.raises(ValueError, match=r"dpo trainer.*missing column 'rejected'.*preference"):
        require_format(datasets.Dataset.from_list([{"prompt": "a", "chosen": "b"}]), "dpo")
    with pytest.raises(ValueError, match=r"missing column 'completion'.*prompt_completion.*language_modeling"):
        require_format(["prompt"], "sft")
    with pytest.raises(ValueError, match=r"missing column 'prompt'"):
        require_format(["text"], "rl")
    with pytest.raises(ValueError, match="missing columns 'chosen', 'rejected'"):
        require_format(["prompt", "completion"], "reward")
    with pytest.raises(ValueError, match="unknown trainer"):
        require_format(["text"], "kto")


def test_is_conversational():
    assert is_conversational({"messages": user("hi")})
    assert is_conversational({"prompt": user("hi"), "completion": assistant("yo")})
    assert not is_conversational({"prompt": "hi", "completion": "yo"})
    assert not is_conversational({"text": "hi"})
    assert not is_conversational({"prompt": []})


def test_extract_prompt_strings_and_messages():
    out = extract_prompt({"chosen": "the sky is blue .", "rejected": "the sky is green ."})
    assert out == {"prompt": "the sky is", "chosen": " blue .", "rejected": " green ."}
    conv = {"chosen": user("sky ?") + assistant("blue"), "rejected": user("sky ?") + assistant("green")}
    assert extract_prompt(conv) == {
        "prompt": user("sky ?"),
        "chosen": assistant("blue"),
        "rejected": assistant("green"),
    }
    explicit = {"prompt": "p", "chosen": "pa", "rejected": "pb", "margin": 1.0}
    assert maybe_extract_prompt(explicit) == explicit
    # a standard prompt with conversational answers: re-extracted from chosen/rejected, as TRL
    mixed = {"prompt": "x", **conv}
    assert maybe_extract_prompt(mixed)["prompt"] == user("sky ?")


# ------------------------------------------------------------------------------------------------- SFT tokenize


def test_sft_text_all_tokens_bos_eos(tok):
    out = tokenize_sft({"text": "the sky is blue ."}, tok)
    assert out["input_ids"] == [tok.bos_token_id, *ids(tok, "the sky is blue ."), tok.eos_token_id]
    assert out["completion_mask"] == [1] * len(out["input_ids"])
    # an EOS already there is not doubled
    assert tokenize_sft({"text": "hi </s>"}, tok)["input_ids"].count(tok.eos_token_id) == 1


def test_sft_prompt_completion_standard(tok):
    out = tokenize_sft({"prompt": "the sky is", "completion": " blue ."}, tok)
    prompt = [tok.bos_token_id, *ids(tok, "the sky is")]
    completion = [*ids(tok, "blue ."), tok.eos_token_id]
    assert out["input_ids"] == prompt + completion
    assert out["completion_mask"] == [0] * len(prompt) + [1] * len(completion)
    assert [t for t, m in zip(out["input_ids"], out["completion_mask"], strict=True) if m] == completion
    all_loss = tokenize_sft({"prompt": "the sky is", "completion": " blue ."}, tok, completion_only_loss=False)
    assert all_loss["completion_mask"] == [1] * len(all_loss["input_ids"])


def test_sft_prompt_completion_conversational(tok):
    example = {"prompt": user("what color is the sky ?"), "completion": assistant("blue")}
    out = tokenize_sft(example, tok)
    prompt_text = tok.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    assert prompt_text.endswith("<|assistant|> ")
    n_prompt = len(ids(tok, prompt_text))
    assert out["completion_mask"] == [0] * n_prompt + [1] * (len(out["input_ids"]) - n_prompt)
    completion_ids = [t for t, m in zip(out["input_ids"], out["completion_mask"], strict=True) if m]
    assert completion_ids == [*ids(tok, "blue"), tok.eos_token_id]  # the template's end-of-turn, no extra EOS
    assert out["input_ids"][0] == tok.bos_token_id and out["input_ids"].count(tok.bos_token_id) == 1


def test_sft_messages_all_tokens(tok):
    out = tokenize_sft({"messages": user("hi") + assistant("hello there")}, tok)
    text = tok.apply_chat_template(user("hi") + assistant("hello there"), tokenize=False)
    assert out["input_ids"] == ids(tok, text)
    assert out["completion_mask"] == [1] * len(out["input_ids"])


def test_sft_truncation_keeps_start(tok):
    full = tokenize_sft({"prompt": "the sky is", "completion": " blue . one two three four"}, tok)
    cut = tokenize_sft({"prompt": "the sky is", "completion": " blue . one two three four"}, tok, max_length=6)
    assert cut["input_ids"] == full["input_ids"][:6] and cut["completion_mask"] == full["completion_mask"][:6]


def test_sft_rejects_other_formats(tok):
    with pytest.raises(ValueError, match="prompt_only"):
        tokenize_sft({"prompt": "hi"}, tok)


# ------------------------------------------------------------------------------------------ preference tokenize


def test_preference_explicit_prompt(tok):
    out = tokenize_preference(ROWS["preference"][0], tok)
    assert out["prompt_ids"] == [tok.bos_token_id, *ids(tok, "the sky is")]
    assert out["chosen_ids"] == [*ids(tok, "blue ."), tok.eos_token_id]
    assert out["rejected_ids"] == [*ids(tok, "green ."), tok.eos_token_id]
    assert "margin" not in out
    assert tokenize_preference({**ROWS["preference"][0], "margin": 2}, tok)["margin"] == 2.0


def test_preference_implicit_prompt_matches_explicit(tok):
    implicit = tokenize_preference({"chosen": "the sky is blue .", "rejected": "the sky is green ."}, tok)
    assert implicit == tokenize_preference(ROWS["preference"][0], tok)


def test_preference_conversational(tok):
    conv = {"chosen": user("sky ?") + assistant("blue"), "rejected": user("sky ?") + assistant("green .")}
    out = tokenize_preference(conv, tok)
    prompt_text = tok.apply_chat_template(user("sky ?"), tokenize=False, add_generation_prompt=True)
    assert out["prompt_ids"] == ids(tok, prompt_text)
    assert out["chosen_ids"] == [*ids(tok, "blue"), tok.eos_token_id]
    assert out["rejected_ids"] == [*ids(tok, "green ."), tok.eos_token_id]
    explicit_prompt = {"prompt": user("sky ?"), "chosen": assistant("blue"), "rejected": assistant("green .")}
    explicit = tokenize_preference(explicit_prompt, tok)
    assert explicit == out


def test_preference_truncation(tok):
    example = {"prompt": "one two three four five six", "chosen": " seven eight nine", "rejected": " ten"}
    out = tokenize_preference(example, tok, max_prompt_length=3)
    assert out["prompt_ids"] == ids(tok, "four five six")  # the prompt keeps its end
    out = tokenize_preference(example, tok, max_prompt_length=4, max_length=6)
    assert out["prompt_ids"] == ids(tok, "three four five six")
    assert out["chosen_ids"] == ids(tok, "seven eight") and out["rejected_ids"] == [*ids(tok, "ten"), tok.eos_token_id]
    out = tokenize_preference(example, tok, max_length=3)  # a long prompt leaves each completion one token
    assert out["prompt_ids"] == ids(tok, "five six") and out["chosen_ids"] == ids(tok, "seven")


def test_tokenize_prompt(tok):
    assert tokenize_prompt({"prompt": "the sky is"}, tok)["prompt_ids"] == [tok.bos_token_id, *ids(tok, "the sky is")]
    conv = tokenize_prompt({"prompt": user("hi")}, tok)["prompt_ids"]
    assert conv == ids(tok, tok.apply_chat_template(user("hi"), tokenize=False, add_generation_prompt=True))
    assert conv[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tokenize_prompt({"prompt": "one two three"}, tok, max_prompt_length=2)["prompt_ids"] == ids(tok, "two three")


def test_tokenize_dataset(tok, tmp_path):
    ds = load_training_dataset(write_jsonl(tmp_path / "p.jsonl", ROWS["prompt_completion"] * 2))
    sft = tokenize_dataset(ds, tok, "sft", max_length=16)
    assert sft.column_names == ["input_ids", "completion_mask"] and sft.num_rows == 2
    pref = tokenize_dataset(datasets.Dataset.from_list(ROWS["preference"]), tok, "dpo")
    assert sorted(pref.column_names) == ["chosen_ids", "prompt_ids", "rejected_ids"]
    rl = tokenize_dataset(datasets.Dataset.from_list([{"prompt": "hi", "answer": "5"}]), tok, "grpo")
    assert sorted(rl.column_names) == ["answer", "prompt", "prompt_ids"]
    with pytest.raises(ValueError, match="missing column 'rejected'"):
        tokenize_dataset(datasets.Dataset.from_list([{"prompt": "a", "chosen": "b"}]), tok, "reward")


# ------------------------------------------------------------------------------------------------------ packing


def random_examples(n, seed, max_len=20):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(1, max_len)
        n_prompt = rng.randint(0, length - 1)
        input_ids = [rng.randint(7, 60) for _ in range(length)]
        out.append({"input_ids": input_ids, "completion_mask": [0] * n_prompt + [1] * (length - n_prompt)})
    return out


def check_packed(rows, max_length):
    for row in rows:
        n = len(row["input_ids"])
        assert 0 < n <= max_length
        assert len(row["labels"]) == len(row["position_ids"]) == n == sum(row["seq_lengths"])
        expected_positions = [p for length in row["seq_lengths"] for p in range(length)]
        assert row["position_ids"] == expected_positions
        for i, p in enumerate(row["position_ids"]):
            if p == 0:  # a document's first token is never a target (no label crosses a document boundary)
                assert row["labels"][i] == IGNORE_INDEX
            elif row["labels"][i] != IGNORE_INDEX:
                assert row["labels"][i] == row["input_ids"][i]


@pytest.mark.parametrize("strategy", ["bfd", "greedy"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_sequences(strategy, seed):
    examples = random_examples(40, seed)
    max_length = 24
    rows = pack_sequences(examples, max_length, strategy=strategy)
    check_packed(rows, max_length)
    # every token is kept, each document whole and contiguous
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    docs = []
    for row in rows:
        start = 0
        for length in row["seq_lengths"]:
            docs.append(tuple(row["input_ids"][start : start + length]))
            start += length
    assert sorted(docs) == sorted(tuple(e["input_ids"]) for e in examples)
    # completion labels survive packing (except each document's first token)
    kept = sum(lab != IGNORE_INDEX for r in rows for lab in r["labels"])
    expected = sum(sum(e["completion_mask"][1:]) for e in examples)
    assert kept == expected
    if strategy == "bfd":
        assert len(rows) <= len(pack_sequences(examples, max_length, strategy="greedy"))


def test_pack_overflow():
    long = {"input_ids": list(range(10, 35)), "completion_mask": [1] * 25}
    short = {"input_ids": [1, 2, 3]}
    truncated = pack_sequences([long, short], 10)
    check_packed(truncated, 10)
    assert sum(len(r["input_ids"]) for r in truncated) == 13
    assert truncated[0]["input_ids"] == list(range(10, 20))
    split = pack_sequences([long, short], 10, overflow="split")
    check_packed(split, 10)
    assert sum(len(r["input_ids"]) for r in split) == 28
    assert sorted(length for r in split for length in r["seq_lengths"]) == [3, 5, 10, 10]
    with pytest.raises(ValueError, match="overflow"):
        pack_sequences([short], 10, overflow="drop")


# ---------------------------------------------------------------------------------------------------- collators


def test_sft_collator_padded(tok):
    examples = [tokenize_sft(r, tok) for r in ROWS["language_modeling"] + ROWS["prompt_completion"]]
    batch = SFTCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape == (3, 8) and longest <= 8 and batch["input_ids"].dtype == torch.long
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == e["input_ids"]
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (8 - n)
        want = [t if m else IGNORE_INDEX for t, m in zip(e["input_ids"], e["completion_mask"], strict=True)]
        assert batch["labels"][i].tolist() == want + [IGNORE_INDEX] * (8 - n)
    assert "position_ids" not in batch
    # prompt tokens carry no loss in the prompt-completion row
    assert (batch["labels"][2, : 1 + len(ids(tok, "the sky is"))] == IGNORE_INDEX).all()


def test_sft_collator_padding_free(tok):
    examples = [tokenize_sft(r, tok) for r in ROWS["language_modeling"] + ROWS["prompt_completion"]]
    batch = SFTCollator(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    total = sum(len(e["input_ids"]) for e in examples)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert batch["position_ids"][0].tolist() == [p for e in examples for p in range(len(e["input_ids"]))]
    assert (batch["labels"][batch["position_ids"] == 0] == IGNORE_INDEX).all()
    # packed rows in both modes
    packed = pack_sequences(random_examples(10, 3), 16)
    free = SFTCollator(pad_token_id=0, padding_free=True)(packed)
    assert free["position_ids"][0].tolist() == [p for r in packed for p in r["position_ids"]]
    assert free["labels"][0].tolist() == [lab for r in packed for lab in r["labels"]]
    padded = SFTCollator(pad_token_id=0)(packed)
    assert padded["position_ids"].shape == padded["input_ids"].shape == (len(packed), 16)
    with pytest.raises(ValueError, match="pad_token_id"):
        SFTCollator(pad_token_id=None)


def test_preference_collator(tok):
    rows = [
        {"prompt": "the sky is", "chosen": " blue .", "rejected": " green . one two", "margin": 0.5},
        {"chosen": user("hi") + assistant("hello there"), "rejected": user("hi") + assistant("bad"), "margin": 1},
    ]
    examples = [tokenize_preference(r, tok) for r in rows]
    batch = PreferenceCollator(pad_token_id=tok.pad_token_id)(examples)
    seqs = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + [
        e["prompt_ids"] + e["rejected_ids"] for e in examples
    ]
    width = max(map(len, seqs))
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "labels", "margin"}
    for key in ("input_ids", "attention_mask", "completion_mask", "labels"):
        assert batch[key].shape == (4, width) and batch[key].dtype == torch.long
    assert batch["margin"].tolist() == [0.5, 1.0] and batch["margin"].dtype == torch.float32
    for row, seq in enumerate(seqs):  # chosen rows first, then the rejected rows of the same pairs
        assert batch["input_ids"][row, : len(seq)].tolist() == seq
        assert (batch["input_ids"][row, len(seq) :] == tok.pad_token_id).all()
        assert batch["attention_mask"][row].sum() == len(seq)
    for pair, e in enumerate(examples):
        n_prompt = len(e["prompt_ids"])
        for row, completion in ((pair, e["chosen_ids"]), (pair + 2, e["rejected_ids"])):
            mask = batch["completion_mask"][row]
            assert mask.tolist() == [0] * n_prompt + [1] * len(completion) + [0] * (width - n_prompt - len(completion))
            assert batch["labels"][row][mask.bool()].tolist() == completion
            assert (batch["labels"][row][~mask.bool()] == IGNORE_INDEX).all()
    no_margin = PreferenceCollator(pad_token_id=tok.pad_token_id)([examples[0], {**examples[1], "margin": None}])
    assert "margin" not in no_margin


def test_reward_collator(tok):
    examples = [tokenize_preference(r, tok) for r in ROWS["preference"] * 2]
    examples[1] = {**examples[1], "chosen_ids": examples[1]["chosen_ids"] + ids(tok, "one two")}
    batch = RewardCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=4)(examples)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] % 4 == 0
    last = batch["attention_mask"].sum(-1) - 1
    assert batch["input_ids"][torch.arange(4), last].tolist() == [
        tok.eos_token_id,
        tok.convert_tokens_to_ids("two"),
        tok.eos_token_id,
        tok.eos_token_id,
    ]
    assert batch["input_ids"][0].tolist()[: last[0] + 1] == examples[0]["prompt_ids"] + examples[0]["chosen_ids"]
    assert batch["input_ids"][2].tolist()[: last[2] + 1] == examples[0]["prompt_ids"] + examples[0]["rejected_ids"]
    with_margin = RewardCollator(pad_token_id=0)([{**e, "margin": 1.5} for e in examples])
    assert with_margin["margin"].tolist() == [1.5, 1.5]


def test_sft_warns_when_tokens_merge_across_the_boundary(tok):
    with pytest.warns(UserWarning, match="not a prefix"):
        out = tokenize_sft({"prompt": "the sky", "completion": "is blue"}, tok)  # "skyis" is one (unknown) word
    assert len(out["input_ids"]) == len(out["completion_mask"])


def test_iterable_dataset_format():
    rows = ROWS["prompt_completion"] * 2
    iterable = datasets.Dataset.from_list(rows).to_iterable_dataset()
    assert detect_format(iterable) == "prompt_completion"
    assert require_format(iterable, "sft") == "prompt_completion"
