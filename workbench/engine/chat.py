"""The conversation of one sample, as tokens, built with the model's own chat template.

Every round's model input is the whole conversation so far: the chat template's rendering of all
earlier user and assistant turns, the new user instruction, the assistant header and the
protocol's assistant prefix. The transcript is kept at the token level: the template's text
between assistant turns is tokenized, and each assistant turn is the exact token ids the model
generated (after the prefix). So round t's input is a token-exact prefix of round t+1's, the model
reads back exactly what it wrote, and one forward pass over the final transcript holds the
residual stream of every round (DESIGN §3).

The conversation grows one round at a time (a live session does not know the next instruction
before it is typed): each round renders the conversation so far plus the new user turn, with each
assistant content replaced by a sentinel, and takes the text after the previous round's sentinel.
The rendering must start with what the earlier rounds rendered (prefix stability), or the
workbench refuses the template.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any

from workbench.errors import WorkbenchError

_SENTINEL = "\ue000{}\ue001"  # private-use characters: never produced by a template or a tokenizer


def styled_tokenizer(tokenizer: Any, chat_template: str = "", system: str = "") -> Any:
    """The tokenizer a protocol's conversation is rendered with: ``tokenizer`` itself when the
    protocol sets neither a chat template nor a system message, else a shallow copy whose
    ``chat_template`` is ``chat_template`` (or the model's own), with, when ``system`` is given, a
    first line that puts the system message before the conversation's messages (a Jinja
    ``set messages = [system] + messages``), so every rendering of the conversation (each round,
    the context-length check, a live session) has it. The original is left as it was; styling a
    styled tokenizer starts again from its original. A template that refuses a system turn fails
    at its first rendering, in one line."""
    import copy

    base = getattr(tokenizer, "workbench_unstyled", tokenizer)
    if not chat_template and not system:
        return base
    if getattr(tokenizer, "workbench_style", None) == (chat_template, system):
        return tokenizer
    template = chat_template
    if not template:
        try:
            template = base.get_chat_template()  # the default one when a tokenizer names several
        except Exception:  # no template at all
            template = ""
    if not template:
        raise WorkbenchError("the protocol's system message needs a chat template: the model has none (give --chat-template FILE)")
    if system:
        literal = json.dumps(system, ensure_ascii=False)  # a JSON string is a Jinja string literal
        template = '{%- set messages = [{"role": "system", "content": ' + literal + '}] + messages -%}' + template
    styled = copy.copy(base)
    styled.chat_template = template
    styled.workbench_style = (chat_template, system)
    styled.workbench_unstyled = base
    return styled


def styled_model(model: Any, protocol: Any) -> Any:
    """``model`` (a :class:`~workbench.engine.models.LoadedModel`) with the tokenizer of
    :func:`styled_tokenizer` for ``protocol``'s chat template and system message; the same object
    when the protocol sets neither. Its ``chat_template_source`` then names the protocol's template
    file (and ``+system``), and the run file's template hash is that of the rendering used."""
    from dataclasses import replace

    tok = styled_tokenizer(model.tokenizer, protocol.chat_template, protocol.system)
    if tok is model.tokenizer:
        return model
    unstyled = getattr(model.tokenizer, "workbench_unstyled_source", model.chat_template_source)
    if not hasattr(tok, "workbench_unstyled"):  # back to the model's own tokenizer
        return replace(model, tokenizer=tok, chat_template_source=unstyled)
    tok.workbench_unstyled_source = unstyled
    source = f"file:{protocol.chat_template_file or 'protocol'}" if protocol.chat_template else unstyled
    return replace(model, tokenizer=tok, chat_template_source=source + (" +system" if protocol.system else ""))


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


def plan_conversation(tokenizer: Any, instructions: list[str], prefixes: list[str], image: bool = False) -> ConversationPlan:
    """Split a conversation of ``len(instructions)`` rounds into the template's text pieces, one
    round at a time (:func:`next_round_input`, as a session builds it). ``image``: the first user
    turn carries an image (see :func:`next_round_input`).

    Raises WorkbenchError when the chat template drops or rewrites assistant messages.
    """
    pieces, history, closing = [], "", ""
    for t in range(len(instructions)):
        piece, closing, history = next_round_input(tokenizer, instructions[: t + 1], prefixes[: t + 1], history, image)
        pieces.append(piece)
    return ConversationPlan(tuple(instructions), tuple(prefixes), tuple(pieces), closing)


def next_round_inputs(
    tokenizer: Any, instructions: list[list[str]], prefixes: list[str] | list[list[str]], histories: list[str], image: bool = False
) -> list[tuple[str, str, str]]:
    """:func:`next_round_input` for every conversation of a batch (``instructions[i]``: row i's
    rounds so far; ``prefixes``: the batch's, one per round, or each row's own, ``[B][rounds]``,
    when a prefix names the sample's options), rendered in one go (:func:`_render_many`).
    Returns one ``(round input, closing, history)`` per row.

    Rows whose new turn is the same (the same round and instruction: a protocol's follow-up) share
    its text: the first and the last row of each such group are rendered, and when their round
    inputs and closings agree, the rows between take them, since a template renders a turn from
    the turn itself, not from the contents before it (then a round renders two conversations, not
    the batch's). When they differ, every row of the group is rendered. (A template whose turn
    text reads earlier messages is caught only where the first and last rows differ in them.)"""
    per_row = [list(p) for p in prefixes] if prefixes and not isinstance(prefixes[0], str) else [list(prefixes)] * len(instructions)
    groups: dict[tuple[int, str, str], list[int]] = {}
    for i, texts in enumerate(instructions):
        groups.setdefault((len(texts), texts[-1], per_row[i][-1]), []).append(i)
    ends = sorted({rows[0] for rows in groups.values()} | {rows[-1] for rows in groups.values()})
    done = dict(zip(ends, _render_rows(tokenizer, instructions, per_row, histories, ends, image)))
    rest = []
    for (n, _, _), rows in groups.items():
        first, last = done[rows[0]], done[rows[-1]]
        if first[:2] == last[:2]:
            done.update({i: (first[0], first[1], histories[i] + first[0] + _SENTINEL.format(n - 1)) for i in rows[1:-1]})
        else:
            rest += rows[1:-1]
    done.update(zip(rest, _render_rows(tokenizer, instructions, per_row, histories, rest, image)))
    return [done[i] for i in range(len(instructions))]


def _render_rows(
    tokenizer: Any, instructions: list[list[str]], prefixes: list[list[str]], histories: list[str], rows: list[int],
    image: bool = False,
) -> list[tuple[str, str, str]]:
    """:func:`next_round_input` of the given rows of a batch (``prefixes[i]``: row i's), rendered in one go."""
    rendered = _render_many(tokenizer, [_messages(instructions[i], prefixes[i], image) for i in rows], add_generation_prompt=False)
    return [_split_round(full, prefixes[i], histories[i], len(instructions[i]) - 1) for full, i in zip(rendered, rows)]


def next_round_input(
    tokenizer: Any, instructions: list[str], prefixes: list[str], history: str, image: bool = False
) -> tuple[str, str, str]:
    """The text that starts the last round of a conversation whose earlier rounds are ``history``.

    ``instructions``/``prefixes`` hold every round so far (the last one is new); ``history`` is the
    third value this function returned for the round before (``""`` before round 1). The
    conversation is rendered with each assistant content replaced by its prefix and a sentinel;
    the text after the previous round's sentinel, up to and including the new round's prefix, is
    the round input. Returns ``(round input, closing text after the new round's answer, history)``.

    ``image``: the first user turn's content is ``[{"type": "image"}, {"type": "text", "text": …}]``
    (an image-text-to-text model's processor template writes its image placeholder there, which
    the processor expands into the image tokens); later turns are plain text.

    Raises WorkbenchError when the rendering does not start with ``history`` (an earlier turn was
    rendered differently once a later one was added) or drops the new assistant message.
    """
    full = _render(tokenizer, _messages(instructions, prefixes, image), add_generation_prompt=False)
    return _split_round(full, prefixes, history, len(instructions) - 1)


def _split_round(full: str, prefixes: list[str], history: str, t: int) -> tuple[str, str, str]:
    """Round ``t``'s input, closing text and new history out of the conversation ``full`` rendered
    with sentinels (see :func:`next_round_input`)."""
    if not full.startswith(history):
        raise WorkbenchError(_NOT_STABLE)
    head, sep, closing = full[len(history) :].partition(prefixes[t] + _SENTINEL.format(t))
    if not sep:
        raise WorkbenchError("the chat template drops or rewrites assistant messages; cannot build a transcript")
    piece = head + prefixes[t]
    return piece, closing, history + piece + _SENTINEL.format(t)


def check_generation_prompt(
    tokenizer: Any, instructions: list[str], prefixes: list[str], round_inputs: list[str], image: bool = False
) -> None:
    """Raise WorkbenchError unless the ``add_generation_prompt=True`` rendering of the conversation up
    to the last user message is the start of the conversation as built from ``round_inputs`` (every
    round so far; up to whitespace the template puts between the assistant header and the content,
    which the round input keeps, as the conversation does). One render: a session checks each new
    round on one sample of its batch."""
    t = len(instructions) - 1
    with_header = _render_many(tokenizer, [_messages(instructions, prefixes, image)[: 2 * t + 1]], add_generation_prompt=True)[0]
    history = "".join(p + _SENTINEL.format(i) for i, p in enumerate(round_inputs[:t])) + round_inputs[t][: len(round_inputs[t]) - len(prefixes[t])]
    if not (history.startswith(with_header) and history[len(with_header) :].strip() == ""):
        raise WorkbenchError(_NOT_STABLE)


def check_prefix_stable(tokenizer: Any, plan: ConversationPlan, image: bool = False) -> None:
    """:func:`check_generation_prompt` for every round of ``plan``."""
    for t in range(len(plan.round_inputs)):
        check_generation_prompt(tokenizer, list(plan.instructions[: t + 1]), list(plan.prefixes[: t + 1]),
                                list(plan.round_inputs[: t + 1]), image)


_NOT_STABLE = ("the chat template is not prefix-stable (a round's prompt is not the start of the conversation "
               "rendered with its answer); the workbench needs a template that renders earlier turns unchanged")


def _messages(instructions: list[str], prefixes: list[str], image: bool = False) -> list[dict[str, Any]]:
    """The conversation with each assistant content replaced by its prefix and a sentinel. With
    ``image``, an image before the first user text, and every content a list of parts, as a
    processor's ``apply_chat_template`` hands them to its template (some, LLaVA-1.5's, render a
    plain string content as nothing)."""
    if image:
        parts = lambda text: [{"type": "text", "text": text}]  # noqa: E731
        messages: list[dict[str, Any]] = []
        for t, text in enumerate(instructions):
            messages.append({"role": "user", "content": ([{"type": "image"}] if t == 0 else []) + parts(text)})
            messages.append({"role": "assistant", "content": parts(prefixes[t] + _SENTINEL.format(t))})
        return messages
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


def _render_many(tokenizer: Any, conversations: list[list[dict[str, str]]], add_generation_prompt: bool) -> list[str]:
    """Each conversation rendered as :func:`_render` renders it, faster: the compiled template is
    called directly with what ``apply_chat_template`` hands it (the messages, ``tools`` and
    ``documents`` None, the special tokens), skipping its per-call normalisation (4× the render
    itself for plain text messages). Once per template and set of special tokens (the direct call
    hands the template the same variables whatever the messages) one conversation is also rendered
    the ordinary way; if the two differ (a transformers version that hands the template more),
    every conversation takes the ordinary way from then on."""
    if not conversations:
        return []
    direct = _direct_renderer(tokenizer)
    key = (str(tokenizer.chat_template), json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str), add_generation_prompt)
    if direct is not None and key not in _DIRECT_CHECKED:
        reference = _render(tokenizer, conversations[0], add_generation_prompt)
        _DIRECT_CHECKED[key] = direct(conversations[0], add_generation_prompt) == reference
    if direct is not None and _DIRECT_CHECKED[key]:
        try:
            return [direct(c, add_generation_prompt) for c in conversations]
        except Exception:  # the ordinary way gives the one-line error
            pass
    return [_render(tokenizer, c, add_generation_prompt) for c in conversations]


_DIRECT_CHECKED: dict[tuple[str, str, bool], bool] = {}  # (template, special tokens, generation prompt) → direct rendering agrees


def _direct_renderer(tokenizer: Any) -> Any:
    """``(messages, add_generation_prompt) → text`` with the tokenizer's compiled chat template, or
    None when this transformers version has no compiled-template helper. :func:`_render_many`
    compares it with ``apply_chat_template`` once per template and special tokens."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(tokenizer.get_chat_template())
    except Exception:  # an older/newer transformers, or no template: the ordinary way
        return None
    specials = dict(tokenizer.special_tokens_map)

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return template.render(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **specials)

    return render


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each template text, in one tokenizer call (special-token text such as
    ``<|im_start|>`` is recognised). Repeated texts (a batch's closing text, a follow-up every row
    shares) are tokenized once; each row gets its own list.

    A fast tokenizer's Rust backend is called directly (the ordinary call wraps every text's
    encoding in Python objects: 1.4× the time for a round's texts on the organism); the first
    time a tokenizer is used, its texts are also tokenized the ordinary way, and if the two differ,
    that tokenizer takes the ordinary way from then on."""
    if not texts:
        return []
    distinct = list(dict.fromkeys(texts))
    ids = dict(zip(distinct, _encode_distinct(tokenizer, distinct)))
    return [list(ids[text]) for text in texts]


_BACKEND_AGREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → its backend tokenizes as it does


def _encode_distinct(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (see :func:`encode`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and (backend.padding is not None or backend.truncation is not None):
        # a call with padding=True (a processor's, on a VLM's first round) leaves the backend padding
        # every batch to its longest text: the ordinary call resets that, the backend would pad
        backend = None
    agrees = _BACKEND_AGREES.get(tokenizer) if backend is not None else False
    if agrees:
        return _backend_ids(backend, texts)
    ordinary = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if agrees is None:
        _BACKEND_AGREES[tokenizer] = _backend_ids(backend, texts) == ordinary
    return ordinary


def _backend_ids(backend: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text from a ``tokenizers.Tokenizer``, without the character offsets when
    this version can leave them out (``encode_batch_fast``: half the time)."""
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in batch(texts, add_special_tokens=False)]
