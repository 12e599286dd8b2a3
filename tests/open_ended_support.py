"""Support for the open-ended tests: tiny Hugging Face sequence classifiers built locally (random
weights, the tiny BPE tokenizer of tiny_models) and saved to a folder, so tests load a scorer or an
NLI model by path as a user would; a prompts file; the CLI run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_models import build_tokenizer
from cli_support import workbench  # noqa: F401  (the open-ended tests import it from here)


def build_classifier(folder: Path, labels: tuple[str, ...], seed: int = 0, multi_label: bool = False) -> Path:
    """Save a tiny random ``LlamaForSequenceClassification`` with labels ``labels`` to ``folder``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, chat_template=None)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
                      problem_type="multi_label_classification" if multi_label else "single_label_classification")
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():  # random init gives logits near 0: spread them so decisions differ between texts
        model.score.weight.mul_(30.0)
    model.save_pretrained(folder)
    return folder


def write_prompts(path: Path, prompts: list[str]) -> Path:
    """A ``--task prompts`` JSONL file with one ``{"prompt": …}`` per line."""
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path

