"""Building a conversation's template pieces from the model's chat template."""

from __future__ import annotations

import pytest
from tiny_models import build_tokenizer

from workbench.chat import check_prefix_stable, plan_conversation
from workbench.errors import WorkbenchError

SPACED = ("{% for m in messages %}{{ ' <' + m['role'] + '> ' + m['content'] + ' <end>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ ' <assistant>' }}{% endif %}")
LAST_TURN_ONLY = ("{{ '<|im_start|>user\\n' + messages[-1]['content'] + '<|im_end|>\\n' }}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_pieces_reassemble_the_rendered_conversation(tmp_path):
    tok = build_tokenizer(tmp_path)
    plan = plan_conversation(tok, ["Q one", "again", "once more"], ["Prefix:", "", "P3"])
    answers = [" A", " B", " C"]
    text = "".join(piece + answer for piece, answer in zip(plan.round_inputs, answers)) + plan.closing
    messages = []
    for instruction, prefix, answer in zip(plan.instructions, plan.prefixes, answers):
        messages += [{"role": "user", "content": instruction}, {"role": "assistant", "content": prefix + answer}]
    assert text == tok.apply_chat_template(messages, tokenize=False)
    assert plan.round_inputs[0].endswith("<|im_start|>assistant\nPrefix:")


def test_a_space_between_header_and_content_is_allowed(tmp_path):
    tok = build_tokenizer(tmp_path, chat_template=SPACED)
    plan = plan_conversation(tok, ["hello", "again"], ["", ""])
    check_prefix_stable(tok, plan)
    assert plan.round_inputs[0] == " <user> hello <end> <assistant> "
    assert plan.round_inputs[1] == " <end> <user> again <end> <assistant> "


def test_a_template_that_drops_earlier_turns_is_refused(tmp_path):
    tok = build_tokenizer(tmp_path, chat_template=LAST_TURN_ONLY)
    with pytest.raises(WorkbenchError, match="drops or rewrites|not prefix-stable"):
        check_prefix_stable(tok, plan_conversation(tok, ["hello", "again"], ["", ""]))
