"""Building a conversation's template pieces from the model's chat template."""

from __future__ import annotations

import pytest
from tiny_models import build_tokenizer

from workbench.engine.chat import (
    _BACKEND_AGREES,
    _DIRECT_CHECKED,
    _render,
    _render_many,
    check_prefix_stable,
    encode,
    next_round_input,
    next_round_inputs,
    plan_conversation,
)
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


TRIMS_AND_TOOLS = ("{{ bos_token }}{% if tools is not none %}TOOLS{% endif %}{% for m in messages %}"
                   "{{ '[' + m['role'] + '] ' + m['content'] | trim + eos_token }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")


@pytest.mark.parametrize("template", [None, SPACED, TRIMS_AND_TOOLS], ids=["chatml", "spaced", "trims-and-tools"])
def test_a_batch_renders_as_apply_chat_template_renders_each_row(tmp_path, template):
    """The session's batched rendering (the compiled template called directly) against the
    ordinary one-conversation way, row by row, on instructions that differ in length and spacing."""
    tok = build_tokenizer(tmp_path) if template is None else build_tokenizer(tmp_path, chat_template=template)
    rows = [["  padded question  ", "review"], ["short", "review"], ["a\nnew line", " think again "]]
    histories = [""] * len(rows)
    for t in range(2):
        batch = next_round_inputs(tok, [r[: t + 1] for r in rows], ["P:", ""][: t + 1], histories)
        one = [next_round_input(tok, r[: t + 1], ["P:", ""][: t + 1], h) for r, h in zip(rows, histories)]
        assert batch == one
        histories = [h for _, _, h in batch]
    conversations = [[{"role": "user", "content": r[0]}] for r in rows]
    assert _render_many(tok, conversations, True) == [_render(tok, c, True) for c in conversations]
    verdicts = [agrees for (text, _, _), agrees in _DIRECT_CHECKED.items() if text == str(tok.chat_template)]
    assert len(verdicts) >= 2 and all(verdicts)  # the direct way was taken (not the fallback), with and without the header


COUNTS_THE_FIRST_MESSAGE = ("{% for m in messages %}{{ ' <' + m['role'] + ' ' + (messages[0]['content'] | length | string) + '> '"
                            " + m['content'] }}{% endfor %}{% if add_generation_prompt %}{{ ' <assistant>' }}{% endif %}")


@pytest.mark.parametrize("template", [None, SPACED, COUNTS_THE_FIRST_MESSAGE], ids=["chatml", "spaced", "counts-first-message"])
def test_rows_sharing_a_follow_up_get_what_rendering_each_row_gives(tmp_path, template):
    """Rows whose new turn is the same share one rendering of it; a template whose new turn reads
    an earlier message (here the first message's length) makes the first and last rows of the group
    disagree, and every row is rendered instead. Both ways equal rendering row by row."""
    tok = build_tokenizer(tmp_path) if template is None else build_tokenizer(tmp_path, chat_template=template)
    firsts = ["q", "a longer question", "  spaced  ", "mid", "a\nnew line"]
    followups = [["review", "again"], ["review", "again"], ["review", "other"], ["think", "again"], ["review", "again"]]
    rows = [[q, *f] for q, f in zip(firsts, followups)]
    prefixes = ["P:", "", "Q:"]
    histories = [""] * len(rows)
    for t in range(3):
        batch = next_round_inputs(tok, [r[: t + 1] for r in rows], prefixes[: t + 1], histories)
        one = [next_round_input(tok, r[: t + 1], prefixes[: t + 1], h) for r, h in zip(rows, histories)]
        assert batch == one
        histories = [h for _, _, h in batch]


def test_encode_gives_the_tokenizers_own_ids(tmp_path, organism):
    """The Rust backend called directly (once checked against the ordinary call) gives the ordinary
    call's ids, special-token text included, on a byte-level BPE and on the organism's tokenizer."""
    texts = ["<|im_start|>user\nWho was forgetful?<|im_end|>\n", "  two  spaces ", "<|im_end|>\n", "é ü", ""]
    for tok in (build_tokenizer(tmp_path), organism.tokenizer):
        for batch in (texts, texts[::-1], [organism.tokenizer.bos_token + " <user> hello <eot>"]):
            assert encode(tok, batch) == [tok(t, add_special_tokens=False)["input_ids"] for t in batch]
        assert _BACKEND_AGREES[tok]  # the direct way was taken after the first call


def test_encode_is_not_padded_by_an_earlier_padded_call(tmp_path):
    """A processor's call with ``padding=True`` (a VLM's first round) leaves the Rust backend padding
    every batch; the texts of later rounds must still come back as the ordinary call gives them."""
    tok = build_tokenizer(tmp_path)
    texts = ["<|im_start|>user\nWho was forgetful, the one on the left?<|im_end|>\n", "<|im_end|>\n"]
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert encode(tok, texts) == want and _BACKEND_AGREES[tok]
    tok(texts, padding=True)
    assert encode(tok, texts) == want
