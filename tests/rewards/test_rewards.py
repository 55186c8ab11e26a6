"""fastalign.rewards: the rule rewards, the code sandbox, the reward-model function and the weighted combination."""

from __future__ import annotations

import logging
import math
import pickle
import time

import pytest
import torch
from helpers.tiny import SPECIALS, WORDS, word_tokenizer
from transformers import LlamaConfig, LlamaForSequenceClassification

from fastalign.rewards import (
    CodeReward,
    RewardModelFunction,
    accuracy_reward,
    completion_text,
    extract_answer,
    extract_code,
    is_equivalent,
    parse_answer,
    reward_function_name,
    score,
    soft_overlong_punishment,
    think_format_reward,
)


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"The answer is \boxed{\frac{1}{2}}.", "0.5"),
        ("so the total is 1234.\n#### 1,234", "1234"),
        ("<answer>3/4</answer>", "0.75"),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{\dfrac{3}{4}}", "She pays 3/4.\n#### 0.75"),
        (r"\boxed{\left( \frac{1}{2} \right)^{2}}", "0.25"),
        (r"\boxed{2\pi}", r"\boxed{2 \pi}"),
        (r"\boxed{x^{2}+2x+1}", "(x+1)^2"),
        (r"\boxed{50\%}", "0.5"),
        (r"\boxed{\sqrt[3]{8}}", "2"),
        (r"\boxed{x = 5}", "5"),
        (r"\boxed{5 \text{ cm}}", "5"),
        (r"\boxed{(1, 2)}", r"\left( 1,2 \right)"),
        (r"\boxed{1{,}000}", "$1,000"),
        (r"<answer>the result is \boxed{-3}</answer>", "-3"),
    ],
)
def test_accuracy_equivalent(completion, gold):
    assert accuracy_reward([completion], [gold]) == [1.0]
    assert accuracy_reward([conv(completion)], [gold]) == [1.0]


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"\boxed{\frac{1}{3}}", "0.5"),
        ("#### 1,235", "1234"),
        ("<answer>4/3</answer>", "0.75"),
        (r"\boxed{(2, 1)}", "(1, 2)"),
        (r"\boxed{x^{2}+1}", "(x+1)^2"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{2}}{2}"),
        ("The answer is 0.5", "0.5"),  # no marker: no answer
        ("", "0.5"),
        (r"\boxed{}", "0.5"),
        (r"\boxed{\frac{1}{2}", "0.5"),  # unbalanced
        (r"\boxed{__import__('os').system('true')}", "0"),
        (r"\boxed{9^{9^{9^{9}}}}", "1"),
        (r"\boxed{10^{100000}}", "1"),
        ("\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}", "1"),
    ],
)
def test_accuracy_wrong_or_missing(completion, gold):
    assert accuracy_reward([completion], [gold]) == [0.0]


def test_accuracy_nested_braces_and_last_box():
    assert extract_answer(r"first \boxed{1}, finally \boxed{\frac{\sqrt{2}}{2}}") == r"\frac{\sqrt{2}}{2}"
    assert is_equivalent(r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}")
    assert accuracy_reward([r"\boxed{\frac{\sqrt{2}}{2}}"], [r"\frac{\sqrt{2}}{2}"]) == [1.0]


def test_accuracy_unparseable_gold_is_none():
    out = accuracy_reward(["\\boxed{3}", "\\boxed{3}", "\\boxed{3}"], ["Paris, the capital of France", None, "3"])
    assert out == [None, None, 1.0]


def test_accuracy_never_raises_and_is_fast():
    weird = [
        "\\",
        "{{{{",
        "\\boxed{\\frac{",
        "#### ",
        "<answer></answer>",
        "\\boxed{1/0}",
        "\\boxed{" + "x^" * 500 + "}",
        "\\boxed{\\sqrt{-1}}",
        "\\boxed{\\infty}",
        "\x00\\boxed{\ud800}",
        "\\boxed{" + "9" * 5000 + "}",
    ]
    start = time.perf_counter()
    out = accuracy_reward(weird, ["1"] * len(weird))
    assert out == [0.0] * len(weird)
    assert time.perf_counter() - start < 10
    assert parse_answer(None) is None


def test_accuracy_length_mismatch():
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        accuracy_reward(["a", "b"], ["1"])


# ---------------------------------------------------------------------------------------------------------------
# format and length
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reward"),
    [
        ("<think>\nreasoning\n</think>\nThe answer is 3.", 1.0),
        ("<think></think>3", 1.0),
        ("<think>a\nb</think> <answer>3</answer>", 1.0),
        ("<think>reasoning</think>", 0.0),  # no answer
        ("<think>reasoning</think>\n  \n", 0.0),
        ("<think>reasoning, no end. The answer is 3.", 0.0),
        (" <think>x</think>3", 0.0),  # not at the start
        ("answer first <think>x</think>", 0.0),
        ("<think>x<think>y</think>3", 0.0),  # a second <think>
        ("<think>x</think>3<think>y</think>4", 0.0),
        ("<think>x</think>3</think>", 0.0),
    ],
)
def test_think_format(text, reward):
    assert think_format_reward([text]) == [reward]
    assert think_format_reward([conv(text)]) == [reward]


def test_soft_overlong_boundaries():
    f = soft_overlong_punishment(max_completion_length=100, soft_punish_cache=20)
    lengths = [0, 79, 80, 81, 90, 99, 100, 101, 500]
    out = f(completion_ids=[[1] * n for n in lengths])
    assert out == pytest.approx([0.0, 0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0])
    g = soft_overlong_punishment(10, 0)
    assert g(completion_ids=[[1] * 10, [1] * 11]) == [0.0, -1.0]
    assert pickle.loads(pickle.dumps(f))(completion_ids=[[1] * 90]) == [-0.5]
    with pytest.raises(ValueError, match="soft_punish_cache"):
        soft_overlong_punishment(10, 11)


# ---------------------------------------------------------------------------------------------------------------
# code
# ---------------------------------------------------------------------------------------------------------------

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def test_code_extract():
    text = "try:\n```python\nx = 1\n```\nbetter:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(text) == "def add(a, b):\n    return a + b\n"
    assert extract_code("def add(a, b): return a + b") == "def add(a, b): return a + b"


def test_code_reward_outcomes():
    reward = CodeReward(timeout=3, memory_mb=512, max_workers=2)
    programs = {
        "pass": "```python\ndef add(a, b):\n    return a + b\n```",
        "partial": "```python\ndef add(a, b):\n    return 3 if a == 1 else 0\n```",  # passes 1 and 2 of 3
        "fail": "```python\ndef add(a, b):\n    return a - b\n```",
        "syntax": "```python\ndef add(a, b)\n    return a + b\n```",
        "raises": "```python\nraise SystemExit(0)\n```",
        # 2 GiB actually written: only the address-space limit (512 MiB here) stops it
        "memory": "```python\nblob = bytearray(b'x') * (2 * 2**30)\ndef add(a, b):\n    return a + b\n```",
        "limits": "```python\nimport resource\nassert resource.getrlimit(resource.RLIMIT_AS) == (512 * 2**20,) * 2\n"
        "assert resource.getrlimit(resource.RLIMIT_CPU) == (3, 3)\nimport os\nassert 'HTTP_PROXY' not in os.environ\n"
        "def add(a, b):\n    return a + b\n```",
        "noisy": "```python\nprint('x' * 10**6)\ndef add(a, b):\n    return a + b\n```",
    }
    rewards = reward(completions=list(programs.values()), tests=[TESTS] * len(programs))
    out = dict(zip(programs, rewards, strict=True))
    assert out["pass"] == 1.0
    assert out["partial"] == pytest.approx(2 / 3)
    assert out["noisy"] == 1.0
    assert out["limits"] == 1.0
    for key in ("fail", "syntax", "raises", "memory"):
        assert out[key] == 0.0, key


def test_code_reward_string_tests_and_none():
    reward = CodeReward(timeout=3)
    program = conv("```python\ndef add(a, b):\n    return a + b\n```")
    assert reward(completions=[program, program, program], tests=["assert add(1, 2) == 3\n", None, []]) == [
        1.0,
        None,
        None,
    ]


def test_code_reward_infinite_loop_times_out():
    reward = CodeReward(timeout=1.5, max_workers=2)
    start = time.perf_counter()
    out = reward(
        completions=[
            "def add(a, b):\n    while True:\n        pass",
            "import time\ntime.sleep(60)\ndef add(a, b): pass",
        ],
        tests=[TESTS, TESTS],
    )
    elapsed = time.perf_counter() - start
    assert out == [0.0, 0.0]
    assert elapsed < 6, elapsed


# ---------------------------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------------------------


def test_score_weights_and_none(caplog):
    def plus_one(completions, **kwargs):
        return [1.0, 1.0, None]

    def by_column(completions, level, **kwargs):
        return [float(x) if x is not None else None for x in level]

    per_function, total = score(
        [plus_one, by_column], [2.0, 0.5], ["p"] * 3, ["a", "b", "c"], [[1], [1, 2], []], {"level": [4, None, None]}
    )
    assert per_function.dtype == torch.float32 and per_function.shape == (3, 2)
    assert per_function[0].tolist() == [1.0, 4.0]
    assert per_function[1, 0] == 1.0 and math.isnan(per_function[1, 1])
    assert total[:2].tolist() == [4.0, 2.0]
    assert math.isnan(total[2])  # every function returned None: unscorable (TRL 1.16)
    assert "every reward function returned None" in caplog.text
    _, total0 = score(
        [plus_one, by_column], None, ["p"] * 3, ["a", "b", "c"], None, {"level": [4, None, None]}, unscorable="zero"
    )
    assert total0.tolist() == [5.0, 1.0, 0.0]


def test_score_builtins_together():
    completions = [conv("<think>2+2</think>\\boxed{4}"), conv("\\boxed{5}")]
    funcs = [accuracy_reward, think_format_reward, soft_overlong_punishment(4, 2)]
    per_function, total = score(
        funcs,
        [1.0, 0.5, 1.0],
        [[{"role": "user", "content": "2+2?"}]] * 2,
        completions,
        [[1, 2], [1, 2, 3, 4]],
        {"solution": ["4", "4"]},
    )
    assert per_function.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, -1.0]]
    assert total.tolist() == [1.5, -1.0]
    assert [reward_function_name(f) for f in funcs] == [
        "accuracy_reward",
        "think_format_reward",
        "soft_overlong_punishment",
    ]


def test_score_errors():
    args = (["p", "q"], ["a", "b"], [[1], [2]])
    with pytest.raises(ValueError, match=r"'short' returned 1 rewards, but 2 were expected"):

        def short(**kwargs):
            return [1.0]

        score([short], None, *args)
    with pytest.raises(TypeError, match=r"'texty' returned 'good' \(str\) for completion 1"):

        def texty(**kwargs):
            return [1.0, "good"]

        score([texty], None, *args)
    with pytest.raises(TypeError, match="expected a list"):
        score([lambda **kwargs: 1.0], None, *args)
    with pytest.raises(ValueError, match="2 reward weights for 1 reward functions"):
        score([lambda **kwargs: [1.0, 1.0]], [1.0, 2.0], *args)
    with pytest.raises(ValueError, match="column 'solution' must be a list with one entry per completion"):
        score([accuracy_reward], None, *args, {"solution": ["1"]})
    with pytest.raises(TypeError, match="RewardModelFunction"):
        score([torch.nn.Linear(2, 1)], None, *args)


def test_score_nan_is_not_applicable_and_inf_is_refused():
    args = (["p", "q", "r"], ["a", "b", "c"], [[1], [2], [3]])

    def nan_second(**kwargs):
        return [1.0, math.nan, None]

    def ones(**kwargs):
        return [1.0, 2.0, 3.0]

    per_function, total = score([nan_second, ones], [0.5, 1.0], *args)
    assert torch.isnan(per_function[1:, 0]).all()
    assert total.tolist() == [1.5, 2.0, 3.0]  # NaN and None are both skipped by the weighted sum
    for bad in (math.inf, -math.inf, torch.tensor(math.inf)):
        with pytest.raises(ValueError, match=r"'blows_up' returned -?inf for completion 1: rewards must be finite"):

            def blows_up(bad=bad, **kwargs):
                return [1.0, bad, 0.0]

            score([blows_up], None, *args)


def test_completion_text():
    assert completion_text("abc") == "abc"
    assert completion_text(conv("abc")) == "abc"
    assert (
        completion_text(
            [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        )
        == "ab"
    )
    assert completion_text(None) == ""


# ---------------------------------------------------------------------------------------------------------------
# reward model
# ---------------------------------------------------------------------------------------------------------------


def tiny_reward_model() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        num_labels=1,
    )
    return LlamaForSequenceClassification(config).train()


def single_row_score(model, ids: list[int]) -> float:
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def test_reward_model_function_standard():
    tok, model = word_tokenizer(), tiny_reward_model()
    prompts = ["what is one plus one ?", "add one to two .", "the sky is"]
    completions = [" two .", " the answer is three", " blue"]
    fn = RewardModelFunction(model, tok, batch_size=2, name="tiny_rm")
    per_function, total = score([fn], None, prompts, completions, [[1]] * 3)
    expected = []
    for p, c in zip(prompts, completions, strict=True):
        ids = tok(p)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected.append(single_row_score(model, ids))
    assert per_function[:, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert total.tolist() == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 6) for x in expected)) == 3  # the rows really differ
    assert model.training  # mode restored
    assert reward_function_name(fn) == "tiny_rm"


def test_reward_model_function_conversational():
    tok, model = word_tokenizer(), tiny_reward_model()
    prompts = [[{"role": "user", "content": "what is one plus one ?"}], [{"role": "user", "content": "the sky is"}]]
    completions = [conv("two ."), conv("blue blue blue")]
    scores = RewardModelFunction(model, tok, batch_size=8)(prompts=prompts, completions=completions)
    assert isinstance(scores, list) and all(isinstance(x, float) for x in scores)
    expected = [
        single_row_score(
            model, tok(tok.apply_chat_template(p + c, tokenize=False), add_special_tokens=False)["input_ids"]
        )
        for p, c in zip(prompts, completions, strict=True)
    ]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_reward_model_function_truncates():
    tok, model = word_tokenizer(), tiny_reward_model()
    fn = RewardModelFunction(model, tok, max_length=5)
    ids = fn.tokenize("what is one plus one ?", " two .")
    assert len(ids) == 5
    assert ids[-1] == tok.convert_tokens_to_ids("two")  # prompt tail + first completion tokens
    assert len(fn(prompts=["what is one plus one ?"], completions=[" two ."])) == 1


def test_score_logs_warning_once_for_all_none(caplog):
    with caplog.at_level(logging.WARNING):
        score([lambda **kwargs: [None]], None, ["p"], ["c"])
    assert caplog.text.count("every reward function returned None") == 1


# ---------------------------------------------------------------------------------------------------------------
# resolve_reward_funcs: names, module:function, reward models, callables and the weights
# ---------------------------------------------------------------------------------------------------------------


def my_reward(completions, **kwargs):
    return [1.0] * len(completions)


def test_resolve_names_specs_models_and_callables(tmp_path):
    from fastalign.rewards import SoftOverlongPunishment
    from fastalign.rewards.resolve import resolve_reward_funcs

    tok, model = word_tokenizer(), tiny_reward_model()
    functions, weights = resolve_reward_funcs(
        [
            "think_format_reward",
            "soft_overlong_punishment",
            "fastalign.rewards.accuracy:accuracy_reward",
            "fastalign.rewards.accuracy.accuracy_reward",
            model,
            my_reward,
        ],
        tokenizer=tok,
        max_completion_length=100,
        soft_punish_cache=20,
    )
    assert functions[0] is think_format_reward and isinstance(functions[1], SoftOverlongPunishment)
    assert (functions[1].max_completion_length, functions[1].soft_punish_cache) == (100, 20)
    assert functions[2] is accuracy_reward and functions[3] is accuracy_reward and functions[5] is my_reward
    assert isinstance(functions[4], RewardModelFunction) and functions[4].model is model
    assert weights == [1.0] * 6
    assert resolve_reward_funcs(my_reward, (2,)) == ([my_reward], [2.0])
    assert resolve_reward_funcs(accuracy_reward, torch.tensor([0.5])) == ([accuracy_reward], [0.5])


def test_resolve_loads_reward_models_from_a_path_with_their_own_tokenizer(tmp_path):
    from fastalign.rewards.resolve import resolve_reward_funcs

    tok = word_tokenizer()
    tiny_reward_model().save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    functions, weights = resolve_reward_funcs(
        [my_reward, str(tmp_path / "rm")], [0.5, 2.0, 1.0], reward_model=str(tmp_path / "rm")
    )
    assert isinstance(functions[0], RewardModelFunction) and functions[1] is my_reward
    assert isinstance(functions[2], RewardModelFunction) and weights == [0.5, 2.0, 1.0]
    for function in (functions[0], functions[2]):  # the reward model comes first, loaded for scoring only
        assert not function.model.training and not any(p.requires_grad for p in function.model.parameters())
        assert function.tokenizer is not tok and function.tokenizer.get_vocab() == tok.get_vocab()
    # load_models=False: everything is checked, nothing is loaded (what fastalign's command line does first)
    unloaded, weights = resolve_reward_funcs(
        ["think_format_reward"], [1, 2], reward_model="owner/rm", load_models=False
    )
    assert unloaded == ["owner/rm", think_format_reward] and weights == [1.0, 2.0]


@pytest.mark.parametrize(
    ("reward_funcs", "options", "error", "message"),
    [
        ([], {}, ValueError, r"reward_funcs is empty"),
        (None, {}, ValueError, r"reward_funcs is empty"),
        ([my_reward, 3], {}, TypeError, r"reward_funcs\[1\] must be a reward function.*got int 3"),
        (
            "blue_reward",
            {},
            ValueError,
            r"reward_funcs: unknown reward function 'blue_reward'; the built-ins are "
            r"accuracy_reward, think_format_reward, code_reward",
        ),
        (
            ["soft_overlong_punishment"],
            {"max_completion_length": 10},
            ValueError,
            r"reward_funcs\[0\] soft_overlong_punishment needs soft_punish_cache",
        ),
        (
            ["soft_overlong_punishment"],
            {"max_completion_length": 10, "soft_punish_cache": 20},
            ValueError,
            r"reward_funcs\[0\] soft_overlong_punishment: soft_punish_cache must be in",
        ),
        (["no_such_module:f"], {}, ValueError, r"reward_funcs\[0\]: cannot import 'no_such_module'"),
        (
            ["fastalign.rewards.rules:missing"],
            {},
            ValueError,
            r"reward_funcs\[0\]: 'missing' in module 'fastalign.rewards.rules' is not found",
        ),
        (
            ["fastalign.rewards.rules:_THINK"],
            {},
            ValueError,
            r"'_THINK' in module 'fastalign.rewards.rules' is not "
            r"callable",
        ),
        (
            [my_reward],
            {"reward_weights": [1.0, 2.0]},
            ValueError,
            r"reward_weights has 2 weights for 1 reward "
            r"functions$",
        ),
        (
            [my_reward],
            {"reward_weights": [1.0], "reward_model": "owner/rm", "load_models": False},
            ValueError,
            r"reward_weights has 1 weights for 2 reward functions \(the reward model first",
        ),
        ([my_reward], {"reward_weights": [math.nan]}, ValueError, r"reward_weights\[0\] must be a finite number"),
        ([my_reward], {"reward_weights": [math.inf]}, ValueError, r"reward_weights\[0\] must be a finite number"),
        ([my_reward], {"reward_weights": ["1"]}, ValueError, r"reward_weights\[0\] must be a finite number, got"),
        ([my_reward], {"reward_weights": [True]}, ValueError, r"reward_weights\[0\] must be a finite number, got"),
        ([my_reward], {"reward_weights": 1.0}, TypeError, r"reward_weights must be a list of numbers"),
        ([my_reward], {"reward_model": 3}, TypeError, r"reward_model must be a path"),
    ],
)
def test_resolve_names_each_mistake(reward_funcs, options, error, message):
    from fastalign.rewards.resolve import resolve_reward_funcs

    with pytest.raises(error, match=message):
        resolve_reward_funcs(reward_funcs, **options)


def test_resolve_a_reward_model_needs_a_tokenizer(tmp_path):
    from fastalign.rewards.resolve import resolve_reward_funcs

    with pytest.raises(
        ValueError,
        match=r"reward_funcs is a reward model \(LlamaForSequenceClassification\): a "
        r"tokenizer is needed",
    ):
        resolve_reward_funcs(tiny_reward_model())
    tiny_reward_model().save_pretrained(tmp_path / "rm")  # no tokenizer beside it
    with pytest.raises(ValueError, match="has no tokenizer of its own and none was given"):
        resolve_reward_funcs(str(tmp_path / "rm"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_reward_funcs(str(tmp_path / "missing"), tokenizer=word_tokenizer())


def test_resolve_code_reward_checks_its_sandbox(monkeypatch):
    from fastalign.rewards import SandboxUnavailableError, code_reward, sandbox, unsandboxed_code_reward
    from fastalign.rewards.resolve import resolve_reward_funcs

    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    with pytest.raises(SandboxUnavailableError, match=r"reward_funcs\[0\] code_reward: .*bubblewrap"):
        resolve_reward_funcs(["code_reward"])
    assert resolve_reward_funcs(["unsandboxed_code_reward"])[0] == [unsandboxed_code_reward]
    assert resolve_reward_funcs([code_reward])[0] == [code_reward]  # a callable is not checked (as before)
