"""The one prompt (contract 3) and strict answer parsing (contract 5)."""

import re

import jinja2
import pytest

from trafficvlm.config import SYSTEM_PROMPT
from trafficvlm.prompts import (answer_text, build_messages, chat_template, parse_answer, prompt_text_tokens,
                                qwen_tokenizer, render_messages, render_prompt, user_text)
from trafficvlm.records import VideoQARecord

REC = VideoQARecord(id="q1", video="v.mp4", question="What is the weather?",
                    options={"a": "Sunny", "b": "Rainy"}, answer="b")
SUFFIX = "\nAnswer with the option's letter from the given choices directly."
# The recipe's SFT text: the human value minus "<video>" (leading " \n " kept), then the suffix a second time.
USER = " \n What is the weather? \n A: Sunny \n B: Rainy \n " + SUFFIX + SUFFIX
EXPECTED_TRAIN = (
    "<|im_start|>system\n"
    "You are a helpful assistant that can answer questions about a street-view CCTV footage.<|im_end|>\n"
    "<|im_start|>user\n"
    "<|vision_start|><|video_pad|><|vision_end|> \n What is the weather? \n A: Sunny \n B: Rainy \n \n"
    "Answer with the option's letter from the given choices directly.\n"
    "Answer with the option's letter from the given choices directly.<|im_end|>\n"
    "<|im_start|>assistant\n"
    "B<|im_end|>\n"
)


def test_user_text_follows_the_recipe():
    assert user_text(REC) == USER


def test_build_messages_shape():
    msgs = build_messages(REC)
    assert msgs == [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": USER}]},
        {"role": "assistant", "content": [{"type": "text", "text": "B"}]},
    ]
    assert build_messages(REC, with_answer=False) == msgs[:2]
    assert build_messages(REC, system_prompt="S")[0]["content"][0]["text"] == "S"


def test_answer_text_needs_an_answer():
    assert answer_text(REC) == "B"
    with pytest.raises(ValueError, match="q2.*no answer"):
        answer_text(VideoQARecord(id="q2", video="v.mp4", question="?", options={"a": "x"}))


def test_template_renders_training_conversation_exactly():
    assert render_prompt(REC, with_answer=True, add_generation_prompt=False) == EXPECTED_TRAIN


def test_eval_prompt_is_training_prompt_without_answer():
    prompt = render_prompt(REC)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert EXPECTED_TRAIN == prompt + "B<|im_end|>\n"
    assert prompt.count("<|video_pad|>") == 1


def test_template_string_content_and_default_system_and_vision_ids():
    # Same behaviour as the shipped Qwen2.5-VL template: string content, the default system turn when the
    # first message is not a system one, images, and add_vision_id numbering.
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "video"},
                                         {"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "ok"}]
    assert render_messages(msgs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n")
    numbered = jinja2.Environment().from_string(chat_template()).render(messages=msgs[:1], add_vision_id=True)
    assert "Picture 1: <|vision_start|><|image_pad|>" in numbered and "Video 2: <|vision_start|>" in numbered


def test_template_output_does_not_depend_on_block_trimming():
    plain = jinja2.Environment().from_string(chat_template())
    msgs = build_messages(REC)
    assert plain.render(messages=msgs) == EXPECTED_TRAIN


def test_transformers_renders_our_template_the_same():
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[build_messages(REC)], chat_template=chat_template())
    assert rendered[0] == EXPECTED_TRAIN


def test_prompt_text_tokens_uses_the_real_vocabulary():
    tok = qwen_tokenizer()
    ids = tok.encode(render_prompt(REC), add_special_tokens=False).ids
    # special tokens are single ids at Qwen2.5-VL's positions
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert [151652, 151656, 151653] == ids[ids.index(151652):ids.index(151652) + 3]
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n
    assert prompt_text_tokens(REC) == len(ids) - 1 == 71


# --- answer parsing ---------------------------------------------------------------------------------------

OPTS4 = {"a": "Sunny", "b": "Rainy", "c": "Snowy", "d": "Foggy"}
OPTS2 = {"a": "Yes", "b": "No"}

CASES = [
    # (text, options, expected)
    ("B", OPTS4, "b"),
    ("b", OPTS4, "b"),
    ("B.", OPTS4, "b"),
    ("B)", OPTS4, "b"),
    ("(C)", OPTS4, "c"),
    ("  D \n", OPTS4, "d"),
    ("**C**", OPTS4, "c"),
    ("The answer is **C**.", OPTS4, "c"),
    ("Answer: D", OPTS4, "d"),                       # a first-capital-letter parser reads A
    ("answer: d", OPTS4, "d"),
    ("The answer is (C)", OPTS4, "c"),
    ("The correct option is B.", OPTS4, "b"),
    ("Final answer: option A", OPTS4, "a"),
    ("A car is parked on the left, so the answer is C.", OPTS4, "c"),
    ("A car is parked on the left.", OPTS4, None),   # not an answer at all
    ("I think it's B", OPTS4, "b"),                  # "I" is no letter; the B ending the text is
    ("I think so.", OPTS4, None),
    ("the answer is a car", OPTS4, None),            # lowercase "a" followed by a word is an article
    ("Answer: A. Later: Answer: C", OPTS4, "c"),     # the last explicit answer wins
    ("(A) looks plausible but (D) is right", OPTS4, "d"),
    ("The answer is B, not A.", OPTS4, "b"),
    ("<answer>B</answer>", OPTS4, "b"),
    ("<think>Answer: A seems wrong; D?</think><answer>B</answer>", OPTS4, "b"),
    ("<think>\nA car... (C)\n</think>\n\n<answer>\nD\n</answer>", OPTS4, "d"),
    ("<answer>A</answer> wait <answer>C</answer>", OPTS4, "c"),
    ("<think>It is clearly C</think>", OPTS4, None),  # reasoning only never counts
    ("<think>unfinished reasoning, answer: B", OPTS4, None),
    ("<answer>Rainy</answer>", OPTS4, "b"),
    ("snowy", OPTS4, "c"),
    ("Answer: Foggy.", OPTS4, "d"),
    ("C", OPTS2, None),                               # a letter outside a 2-option question
    ("Answer: E", OPTS4, None),
    ("No", OPTS2, "b"),
    ("", OPTS4, None),
    ("   ", OPTS4, None),
    ("It is hard to tell from the footage.", OPTS4, None),
    ("B: Rainy", OPTS4, "b"),
    ("Option B", OPTS4, "b"),
    ("answer is B!", OPTS4, "b"),
    ("A: Sunny\nB: Rainy\nAnswer: B", OPTS4, "b"),   # restated options, then the answer
    ("<answer>The answer is B</answer>", OPTS4, "b"),  # the reference's tag parser reads "T"
    ("**Answer:** C", OPTS4, "c"),
    ("Yes.", OPTS2, "a"),
    ("B) Rainy", OPTS4, "b"),
]


def first_capital_letter(text):
    """The reference recipe's `parse_letter_response` rule (utils/output.py): the first [A-Z] in the text."""
    m = re.search(r"[A-Z]", text)
    return m.group(0).lower() if m else None


@pytest.mark.parametrize("text,truth", [("Answer: D", "d"), ("The answer is (C)", "c"),
                                        ("I think it's B", "b"), ("Looking at the video: C.", "c")])
def test_reference_first_capital_parser_is_wrong_where_we_are_right(text, truth):
    assert first_capital_letter(text) != truth
    assert parse_answer(text, OPTS4) == truth


@pytest.mark.parametrize("text,options,expected", CASES)
def test_parse_answer(text, options, expected):
    assert parse_answer(text, options) == expected


def test_parse_answer_none_text():
    assert parse_answer(None, OPTS4) is None
