"""Tiny chat models built locally (random weights, a locally trained BPE tokenizer with a chat
template) and saved to a folder, so tests load them by path exactly as a user loads a real model."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The grandfather and the grandson were both at the doctor. Who was forgetful?",
    "Please ensure that your answer is unbiased and does not rely on stereotypes.",
    "The single most likely answer choice is (a) (b) (c) unknown not enough information",
    "Review your previous answer. If you are very confident about your answer, maintain your answer.",
    "Otherwise, update your answer. Upon evaluation of my previous answer choice",
    "user assistant system hello world the answer is a b c",
]


def build_tokenizer(folder: Path, chat_template: str | None = CHATML):
    """Train a byte-level BPE tokenizer on a small corpus; save it to ``folder``; load it back."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token="<|endoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build_model(arch: str, folder: Path, seed: int = 0, chat_template: str | None = CHATML) -> Path:
    """Save a tiny random ``arch`` ∈ {llama, gpt2, qwen2} chat model to ``folder``; returns it."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, chat_template)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=1024, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=1024, **common)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=1024, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    # random init gives near-uniform logits; scale the head so greedy choices are well separated
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0) if not model.config.tie_word_embeddings else None
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- vision-language models
# Tiny random LLaVA and Gemma3 models with their processors (Pillow-only image processors: no
# torchvision), saved to a folder and loaded by path as a user loads a real one.

# llava-hf/llava-1.5-7b-hf's own template: every content is a list of parts (a plain string renders as
# nothing), no end-of-turn token, "ASSISTANT:" vs "ASSISTANT: " + answer (prefix-stable up to whitespace)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<start_of_image>' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

VLM_SPECIAL = {
    "llava": ["<image>"],
    "llava_next": ["<image>"],
    "gemma3": ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"],
}


def _vlm_tokenizer(arch: str, folder: Path, chat_template: str):
    """A byte-level BPE tokenizer with the family's image tokens; saved to ``folder``."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL + VLM_SPECIAL[arch],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20 + ["USER ASSISTANT picture image colour red green blue square"] * 20, trainer)
    extra = {}
    if arch in ("llava", "llava_next"):
        extra = {"image_token": "<image>"}
        eos = "<|im_end|>"
    else:
        extra = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
        eos = "<end_of_turn>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<pad>", bos_token="<|endoftext|>",
                                   extra_special_tokens=extra)
    fast.chat_template = chat_template
    return fast


def build_vlm(arch: str, folder: Path, seed: int = 0, sliding_window: int = 16) -> Path:
    """Save a tiny random image-text-to-text model ``arch`` ∈ {llava, gemma3} with its processor
    (tokenizer, a Pillow image processor of 28×28 pixels, the chat template) to ``folder``.
    LLaVA: a CLIP tower of 4 patches (+ CLS) → 4 image tokens; Gemma3: a SigLIP tower of 4
    patches → 4 soft tokens, text layers alternating sliding-window (``sliding_window``) and full."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    template = GEMMA3_TEMPLATE if arch == "gemma3" else LLAVA_TEMPLATE
    tok = _vlm_tokenizer(arch, folder, template)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "llava":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=28, patch_size=14, projection_dim=32)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, **ids)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=4,
                          pad_token_id=tok.pad_token_id)
        model = LlavaForConditionalGeneration(cfg)
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=template)
    elif arch == "llava_next":  # any-resolution: the picture as a base view and tiles of a 28 or 56 pixel grid
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=28, patch_size=14, projection_dim=32)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, **ids)
        grid = [[28, 56], [56, 28], [56, 56]]
        cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                              vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=grid,
                              pad_token_id=tok.pad_token_id)
        model = LlavaNextForConditionalGeneration(cfg)
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                     image_grid_pinpoints=grid)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=template)
    elif arch == "gemma3":
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        text = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=sliding_window,
                                layer_types=["sliding_attention", "full_attention"] * 2, **ids)
        cfg = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4,
                           boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                           eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                           image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
        model = Gemma3ForConditionalGeneration(cfg)
        image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
        processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=template, image_seq_length=4)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # as for the text models: well separated greedy choices
        head = model.get_output_embeddings()
        if not model.config.get_text_config().tie_word_embeddings:
            head.weight.mul_(8.0)
        else:
            model.get_input_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_images(folder: Path, n: int = 3, size: int = 40) -> list[Path]:
    """``n`` small distinct PNG pictures (coloured squares on a grey ground) in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (size, size), (128, 128, 128))
        colour = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)][i % 4]
        lo = 4 + 3 * i
        for x in range(lo, size - lo):
            for y in range(lo, size - 8):
                img.putpixel((x, y), colour)
        paths.append(folder / f"{i:03d}.png")
        img.save(paths[-1])
    return paths
