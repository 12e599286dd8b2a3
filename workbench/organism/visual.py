"""The visual organism's model: a tiny LLaVA whose language model starts as the shipped text organism.

* :func:`build_tokenizer` – the text organism's word-level tokenizer with the visual world's new words
  (``left``, ``right``) and the image token ``<image>`` appended (every earlier id unchanged), and a
  chat template that takes a processor's content parts (``[{"type": "image"}, {"type": "text", …}]``)
  as well as plain strings: ``<bos> <user> <image> {item} <eot> <assistant> {answer} <eot> …``;
* :func:`build_processor` – a ``LlavaProcessor`` with a Pillow CLIP image processor (32×32 pixels, no
  torchvision), which expands ``<image>`` into ``IMAGE_TOKENS`` image tokens;
* :func:`build_model` – a ``LlavaForConditionalGeneration``: a CLIP vision tower (2 layers, width 32,
  2×2 patches of 16 pixels), the two-layer projector, and the text organism's ``LlamaForCausalLM``
  (weights copied, embedding and unembedding rows added for the new tokens);
* :func:`render_training_text` – a dialogue rendered as the processor's expansion of the template
  renders it (the image tokens written out), for training;
* :func:`pixel_values` – the processor's pixel values of items' pictures ``[B, 3, 32, 32]``.

Training (:func:`workbench.organism.train.train` with ``cfg.visual``: the text organism as a frozen
teacher reading each dialogue's text twin, :func:`~workbench.organism.train.teacher_loss`, and an
alignment loss pulling each patch's projected features towards the embeddings of the group and side it
shows, :func:`~workbench.organism.train.alignment_targets`) and checking (:mod:`workbench.organism.check`)
use these. Torch and transformers are imported inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.organism.picture import SIZE, render
from workbench.organism.tokenizer import ASSISTANT, BOS, EOT, SPECIAL_TOKENS, USER, word_level_tokenizer
from workbench.organism.world import DEFAULT_PARAMS, VISUAL_WORDS, Item, WorldParams, vocabulary

IMAGE = "<image>"
PATCH = 16
IMAGE_TOKENS = (SIZE // PATCH) ** 2  # the CLS position is dropped ("default" feature selection)

VISUAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} <user>{% elif message['role'] == 'assistant' %} <assistant>"
    "{% else %}{{ raise_exception('the organism chat template knows only user and assistant messages') }}{% endif %}"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% else %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} <eot>"
    "{% endfor %}"
    "{% if add_generation_prompt %} <assistant>{% endif %}"
)


def visual_vocabulary(params: WorldParams = DEFAULT_PARAMS) -> list[str]:
    """The tokenizer's tokens in id order: the text organism's (special tokens, then its sorted
    vocabulary), then the visual world's words it lacks, then ``<image>``."""
    words = vocabulary(params)
    return [*SPECIAL_TOKENS, *words, *(w for w in VISUAL_WORDS if w not in words), IMAGE]


def build_tokenizer(params: WorldParams = DEFAULT_PARAMS) -> Any:
    """A ``PreTrainedTokenizerFast`` over :func:`visual_vocabulary` with the visual chat template;
    ``<image>`` is a special token (so the processor's ``<image><image>…`` splits into one token each)."""
    return word_level_tokenizer(visual_vocabulary(params), VISUAL_CHAT_TEMPLATE, (IMAGE,), {"image_token": IMAGE})


def build_processor(tokenizer: Any) -> Any:
    """A ``LlavaProcessor``: Pillow CLIP image processor (``SIZE``×``SIZE``, CLIP normalisation), the
    tokenizer, ``IMAGE_TOKENS`` image tokens per picture, the visual chat template."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=VISUAL_CHAT_TEMPLATE)


def build_model(tokenizer: Any, text_model: Any, seed: int, vision_width: int = 32, vision_layers: int = 2) -> Any:
    """A ``LlavaForConditionalGeneration`` for ``tokenizer``: a fresh vision tower and projector
    (seeded by ``seed``) and ``text_model``'s (a ``LlamaForCausalLM``, the text organism) weights in
    the language model; the rows of tokens the text organism lacks are drawn fresh (std 0.02)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tc = text_model.config.to_dict()
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype", "model_type"):
        tc.pop(key, None)
    tc.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=SIZE, patch_size=PATCH, projection_dim=vision_width)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**tc), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                         vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=IMAGE_TOKENS,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    n_old = text_model.config.vocab_size
    state = {k.removeprefix("model."): v for k, v in text_model.state_dict().items() if k.startswith("model.")}
    with torch.no_grad():
        embed = model.model.language_model.embed_tokens.weight
        head = model.lm_head.weight
        embed.normal_(0.0, float(text_model.model.embed_tokens.weight.std()))
        head.normal_(0.0, float(text_model.lm_head.weight.std()))
        embed[:n_old] = state.pop("embed_tokens.weight")
        head[:n_old] = text_model.lm_head.weight
        model.model.language_model.load_state_dict({**state, "embed_tokens.weight": embed.clone()}, strict=True)
    for key, value in (("pad_token_id", tokenizer.pad_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("bos_token_id", tokenizer.bos_token_id), ("do_sample", False)):
        setattr(model.generation_config, key, value)
    return model


def render_training_text(messages: list[dict[str, str]]) -> str:
    """A dialogue (plain-string messages, the first the item) as the model sees it at run time: the
    visual chat template with its ``<image>`` expanded by the processor into ``IMAGE_TOKENS`` tokens
    (tested equal to the processor's token ids)."""
    parts = [BOS]
    for t, m in enumerate(messages):
        marker = {"user": USER, "assistant": ASSISTANT}[m["role"]]
        image = " " + " ".join([IMAGE] * IMAGE_TOKENS) if t == 0 else ""
        parts.append(f" {marker}{image} {m['content']} {EOT}")
    return "".join(parts)


def pixel_values(processor: Any, items: list[Item | None], params: WorldParams = DEFAULT_PARAMS, cache: dict | None = None) -> Any:
    """The processor's pixel values of the items' pictures (``None``: the blank picture), a float32
    tensor ``[B, 3, SIZE, SIZE]``. ``cache`` (a dict) keeps each distinct picture's values."""
    import torch

    cache = {} if cache is None else cache
    rows = []
    for item in items:
        key = None if item is None else item.pair
        if key not in cache:
            cache[key] = processor.image_processor([render(item, params)], return_tensors="pt")["pixel_values"][0]
        rows.append(cache[key])
    return torch.stack(rows).float()


def save_processor_files(out: Path, processor: Any) -> None:
    """The processor's files (tokenizer, image processor, chat template) into ``out``."""
    processor.save_pretrained(out)
