"""The conversation of one sample, as tokens, built with the model's own chat template.

Every round's model input is the whole conversation so far: the chat template's rendering of all
earlier user and assistant turns, the new user instruction, the assistant header and the
protocol's assistant prefix. The transcript is kept at the token level: the template's text
between assistant turns is tokenized, and each assistant turn is the exact token ids the model
generated (after the prefix). So round t's input is a token-exact prefix of round t+1's, the model
reads back exactly what it wrote, and one forward pass over the final transcript holds the
residual stream of every round (DESIGN §3).

To find the template's text around assistant turns, the conversation is rendered once with each
assistant content replaced by a sentinel and split there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench.errors import WorkbenchError

_SENTINEL = "\ue000{}\ue001"  # private-use characters: never produced by a template or a tokenizer


@dataclass(frozen=True)
class ConversationPlan:
    """The fixed text of a sample's conversation, everything but the assistant's own tokens.

    ``round_inputs[t]`` is the text that starts round t: the template up to and including the
    assistant header of round t plus the assistant prefix (for t ≥ 1, from the end of the previous
    assistant content). ``closing`` is the template text after the last assistant content.
    """

    instructions: tuple[str, ...]
    prefixes: tuple[str, ...]
    round_inputs: tuple[str, ...]
    closing: str


def plan_conversation(tokenizer: Any, instructions: list[str], prefixes: list[str]) -> ConversationPlan:
    """Split a conversation of ``len(instructions)`` rounds into the template's text pieces.

    Raises WorkbenchError when the chat template drops or rewrites assistant messages.
    """
    messages = _messages(instructions, prefixes)
    full = _render(tokenizer, messages, add_generation_prompt=False)
    pieces, rest = [], full
    for t in range(len(instructions)):
        marker = prefixes[t] + _SENTINEL.format(t)
        head, sep, rest = rest.partition(marker)
        if not sep:
            raise WorkbenchError("the chat template drops or rewrites assistant messages; cannot build a transcript")
        pieces.append(head + prefixes[t])
    return ConversationPlan(tuple(instructions), tuple(prefixes), tuple(pieces), rest)


def check_prefix_stable(tokenizer: Any, plan: ConversationPlan) -> None:
    """Raise WorkbenchError unless every round's ``add_generation_prompt=True`` rendering is the
    start of the conversation rendered with its answers (up to whitespace the template puts between
    the assistant header and the content, which the round input keeps, as the conversation does).

    The check renders the template once per round; the engine makes it on one sample per batch."""
    messages = _messages(list(plan.instructions), list(plan.prefixes))
    pieces, prefixes = plan.round_inputs, plan.prefixes
    for t in range(len(pieces)):
        with_header = _render(tokenizer, messages[: 2 * t + 1], add_generation_prompt=True)
        history = "".join(p + _SENTINEL.format(i) for i, p in enumerate(pieces[:t])) + pieces[t][: len(pieces[t]) - len(prefixes[t])]
        if not (history.startswith(with_header) and history[len(with_header) :].strip() == ""):
            raise WorkbenchError(
                "the chat template is not prefix-stable (a round's prompt is not the start of the conversation "
                "rendered with its answer); the workbench needs a template that renders earlier turns unchanged"
            )


def _messages(instructions: list[str], prefixes: list[str]) -> list[dict[str, str]]:
    """The conversation with each assistant content replaced by its prefix and a sentinel."""
    messages = []
    for t, text in enumerate(instructions):
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": prefixes[t] + _SENTINEL.format(t)})
    return messages


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors of a foreign template: one line for the user
        raise WorkbenchError(f"the model's chat template failed to render ({type(e).__name__}: {e})") from None


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each template text, in one tokenizer call (special-token text such as
    ``<|im_start|>`` is recognised)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
