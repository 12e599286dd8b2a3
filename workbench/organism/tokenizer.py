"""The organism's word-level tokenizer and chat template.

Every token is one space-separated word of the world or a special token, so tokenization is
canonical: ``decode(encode(text)) == text`` for every text the world writes, and tokenizing a chat
rendering equals concatenating the tokenizations of its pieces wherever it is split at a message
boundary. A rendering reads (single spaces between all tokens)::

    <bos> <user> {item} <eot> <assistant> {answer} <eot> <user> {instruction} <eot> <assistant> ...

``eos_token`` is ``<eot>``, the token the model emits after its answer; ``pad_token`` is ``<pad>``.
No token is added by ``add_special_tokens``: the template writes ``<bos>`` itself.
"""

from __future__ import annotations

from typing import Any

from workbench.organism.world import DEFAULT_PARAMS, WorldParams, vocabulary

PAD, UNK, BOS, EOT, USER, ASSISTANT = "<pad>", "<unk>", "<bos>", "<eot>", "<user>", "<assistant>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOT, USER, ASSISTANT)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} <user> {{ message['content'] }} <eot>"
    "{% elif message['role'] == 'assistant' %} <assistant> {{ message['content'] }} <eot>"
    "{% else %}{{ raise_exception('the organism chat template knows only user and assistant messages') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} <assistant>{% endif %}"
)


def render(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat template applied in plain Python (identical output, tested); used to build training data fast."""
    parts = [BOS]
    for m in messages:
        marker = {"user": USER, "assistant": ASSISTANT}[m["role"]]
        parts.append(f" {marker} {m['content']} {EOT}")
    if add_generation_prompt:
        parts.append(f" {ASSISTANT}")
    return "".join(parts)


def word_level_tokenizer(tokens: list[str], chat_template: str, extra_special: tuple[str, ...] = (),
                         named: dict[str, str] | None = None) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` splitting on whitespace, each of ``tokens`` its own id
    (in order), the organism's special tokens and ``extra_special`` never split, ``named`` extra special
    tokens by role (``{"image_token": "<image>"}``), and ``chat_template`` set."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(tokens)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, *extra_special],
        **({"extra_special_tokens": named} if named else {}),
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
        model_max_length=1024,
    )


def build_tokenizer(params: WorldParams = DEFAULT_PARAMS) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` over the world's words, with the chat template set."""
    return word_level_tokenizer([*SPECIAL_TOKENS, *vocabulary(params)], CHAT_TEMPLATE)
