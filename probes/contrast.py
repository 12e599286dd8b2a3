"""Contrast sets: texts labelled for a concept, as token ids, with optional positive/negative pairs.

Sources (``--contrast``):

* ``organism`` – dialogue prefixes of the organism's world ending at a round's assistant header,
  labelled by the exact posterior (fair when p(fair | prefix) ≥ 0.8, biased when ≤ 0.2; the
  ambiguous middle is left out), each with its exact log-odds as ``target``; for a regression
  method (``ridge``) nothing is left out (``margin`` 0: label fair when p ≥ ½), since the middle is
  where the target is most informative; or, for the paired methods, pairs that share a dialogue
  prefix and differ only in the last instruction (a moral vs an immoral phrasing); for the visual
  organism (a vision-language model's processor given) the same prefixes drawn as visual dialogues,
  each with its item's picture in the first user message, as ``organism-visual`` runs show it;
* a pair JSONL file – ``{"positive": ..., "negative": ...}`` per line;
* a labelled JSONL file – ``{"text": ..., "label": 0|1}`` per line (e.g. toxic comments).

JSONL texts are used as written (``--format raw``) or as one user message through the model's chat
template with the assistant header after it (``--format chat``). For a vision-language model every
line may carry an ``"image"`` (a path relative to the file; every line or none): the picture goes
in the user message before the text (``--format chat``), as a run's first turn does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class ContrastSet:
    """``n`` tokenized texts with 0/1 labels; ``pairs`` ``[n_pairs, 2]`` = (positive index, negative index)."""

    name: str
    token_ids: list[list[int]]
    labels: np.ndarray  # [n] int64
    pairs: np.ndarray | None  # [n_pairs, 2] int64
    target: np.ndarray | None  # [n] a continuous ground truth (organism: exact posterior log-odds)
    digest: str  # sha256 of the texts and labels (and pictures): recorded in the probe file
    margin: float | None = None  # organism: prefixes with |p(fair) − ½| < margin were left out
    images: list[str] | None = None  # [n] each text's picture (a vision-language model's contrast); None: text only


def _digest(token_ids: list[list[int]], labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for ids, label in zip(token_ids, labels):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(bytes([int(label)]))
    return h.hexdigest()[:16]


def _encode(tokenizer: Any, text: str, fmt: str) -> list[int]:
    if fmt == "chat":
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


@dataclass(frozen=True)
class ContrastTexts:
    """A contrast file's texts before tokenizing: ``labels [n]`` 0/1, ``pairs [n_pairs, 2]`` or None."""

    name: str
    texts: list[str]
    labels: np.ndarray
    pairs: np.ndarray | None
    images: list[dict[str, Any]] | None = None  # [n] each text's image record (workbench.engine.images.image_record)


MAX_CONTRAST_LINES = 100_000  # probe fit's default cap (--max-lines): a forward pass per text


def read_contrast_file(path: Path, max_lines: int | None = MAX_CONTRAST_LINES) -> ContrastTexts:
    """A pair file or a labelled file (told apart by the keys of the first line), checked line by
    line; needs no model, so ``probe fit`` reads it before loading one. More than ``max_lines``
    lines are refused as soon as the next is read (None: no cap)."""
    from workbench.engine.records import read_jsonl

    rows = read_jsonl(Path(path), max_rows=max_lines, cap_option="--max-lines")
    if not rows:
        raise WorkbenchError(f"{path}: no contrast lines")
    paired = "positive" in rows[0][1]
    with_image = "image" in rows[0][1]
    texts, labels, pairs, images = [], [], [], []
    for lineno, row in rows:
        if ("image" in row) != with_image:
            raise WorkbenchError(f"{path}:{lineno}: every contrast line or none carries an \"image\" (line {rows[0][0]} "
                                 f"{'does' if with_image else 'does not'})")
        if with_image:
            from workbench.engine.images import image_record

            given = row["image"]
            if not isinstance(given, str) or not given.strip() or "\x00" in given:
                raise WorkbenchError(f"{path}:{lineno}: image must be a path (relative to the file)")
            record = image_record(Path(path).parent / given, given, f"{path}:{lineno}")
            images += [record] * (2 if paired else 1)
        if paired:
            if not isinstance(row.get("positive"), str) or not isinstance(row.get("negative"), str):
                raise WorkbenchError(f"{path}:{lineno}: a pair line needs string fields 'positive' and 'negative'")
            if not row["positive"].strip() or not row["negative"].strip():
                raise WorkbenchError(f"{path}:{lineno}: empty text (a contrast text needs at least one word)")
            pairs.append((len(texts), len(texts) + 1))
            texts += [row["positive"], row["negative"]]
            labels += [1, 0]
        else:
            label = row.get("label")
            if not isinstance(row.get("text"), str) or isinstance(label, bool) or label not in (0, 1):
                raise WorkbenchError(f"{path}:{lineno}: a labelled line needs 'text' (string) and 'label' (0 or 1)")
            if not row["text"].strip():
                raise WorkbenchError(f"{path}:{lineno}: empty text (a contrast text needs at least one word)")
            texts.append(row["text"])
            labels.append(int(label))
    if len(set(labels)) < 2:
        raise WorkbenchError(f"{path}: every line has label {labels[0]}; a contrast needs both")
    return ContrastTexts(Path(path).stem, texts, np.asarray(labels, dtype=np.int64),
                         np.asarray(pairs, dtype=np.int64) if paired else None, images if with_image else None)


def check_splittable(name: str, labels: np.ndarray, pairs: np.ndarray | None, test_fraction: float) -> None:
    """Refuse a contrast too small for a held-out split of ``test_fraction`` (by pair when paired,
    else in each label): each side must get at least one item."""
    groups = {"pairs": len(pairs)} if pairs is not None else {f"label-{v} texts": int((labels == v).sum()) for v in (1, 0)}
    for what, count in groups.items():
        n_test = int(round(count * test_fraction))
        if not 0 < n_test < count:
            raise WorkbenchError(f"{name}: {count} {what} cannot be split into training and held-out parts "
                                 f"with --test-fraction {test_fraction} (add lines or change the fraction)")


def load_jsonl_contrast(path: Path, tokenizer: Any, fmt: str = "raw", processor: Any = None,
                        max_lines: int | None = MAX_CONTRAST_LINES) -> ContrastSet:
    """A pair file or a labelled file (see :func:`read_contrast_file`), tokenized; lines with
    pictures through ``processor`` (a vision-language model's), which expands the image tokens;
    ``max_lines``: see :func:`read_contrast_file`."""
    if fmt not in ("raw", "chat"):
        raise WorkbenchError(f"--format must be raw or chat, not {fmt!r}")
    texts = read_contrast_file(path, max_lines)
    if texts.images is None:
        token_ids = [_encode(tokenizer, text, fmt) for text in texts.texts]
        return ContrastSet(name=texts.name, token_ids=token_ids, labels=texts.labels, pairs=texts.pairs, target=None,
                           digest=_digest(token_ids, texts.labels))
    if processor is None:
        raise WorkbenchError(f"{path}: the contrast lines carry images, but the model is text-only "
                             "(give an image-text-to-text model, or lines without \"image\")")
    if fmt != "chat":
        raise WorkbenchError(f"{path}: contrast lines with images need --format chat (the picture goes in the user message)")
    token_ids = [_encode_with_image(tokenizer, processor, text, record["path"]) for text, record in zip(texts.texts, texts.images)]
    digest = _digest(token_ids, texts.labels)
    digest = hashlib.sha256((digest + "".join(r["sha256"] for r in texts.images)).encode()).hexdigest()[:16]
    return ContrastSet(name=texts.name, token_ids=token_ids, labels=texts.labels, pairs=texts.pairs, target=None,
                       digest=digest, images=[r["path"] for r in texts.images])


def _encode_with_image(tokenizer: Any, processor: Any, text: str, image: str) -> list[int]:
    """One user message with the picture before ``text``, through the chat template and the
    processor (the image placeholder expanded into the image tokens), the assistant header after it."""
    from workbench.engine.images import load_image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(processor(text=[rendered], images=[[load_image(image)]], add_special_tokens=False)["input_ids"][0])


ORGANISM_CONTRAST_SEED = 777  # disjoint from training, `organism check` and the run task's items
ORGANISM_MARGIN = 0.3  # the classifiers' organism contrast: p(fair) ≥ 0.8 or ≤ 0.2


def organism_contrast(tokenizer: Any, n: int = 2000, paired: bool = False, seed: int = ORGANISM_CONTRAST_SEED, margin: float = ORGANISM_MARGIN,
                      processor: Any = None) -> ContrastSet:
    """The organism's concept contrast (see the module docstring): ``n`` texts drawn from world
    dialogues, each prefix kept unless ``|p(fair) − ½| < margin``; ``target`` ``[n]`` is its exact
    log-odds (NaN for the pairs). ``processor`` (the visual organism's): the same draws as visual
    dialogues, the item's picture before the first message's text (``images``: one picture path per
    text, written once per pair of groups to the task's private picture folder); the digest covers
    which picture each text shows."""
    from workbench.organism.posterior import dialogue_trace
    from workbench.organism.world import DEFAULT_PARAMS, sample_dialogue

    visual = processor is not None
    pictures: list[str] = []
    if visual:
        from workbench.engine.images import load_image
        from workbench.organism.picture import save
        from workbench.organism.task import picture_folder

        folder = picture_folder()

    rng = np.random.default_rng(seed)
    params = DEFAULT_PARAMS
    token_ids: list[list[int]] = []
    labels: list[int] = []
    target: list[float] = []
    pairs: list[tuple[int, int]] = []
    def encode(messages: list[dict[str, Any]], item: Any) -> list[int]:
        if not visual:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        path = folder / f"contrast-{item.pair[0]}-{item.pair[1]}.png"
        if not path.exists():
            save(item, path, params)
        pictures.append(str(path))
        first = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": messages[0]["content"]}]}
        rendered = tokenizer.apply_chat_template([first, *messages[1:]], tokenize=False, add_generation_prompt=True)
        return list(processor(text=[rendered], images=[[load_image(path)]], add_special_tokens=False)["input_ids"][0])

    attempts = 0
    while len(token_ids) < n:
        attempts += 1
        if attempts > 50 * n:
            raise WorkbenchError("could not draw enough organism contrast prefixes")
        d = sample_dialogue(rng, params, visual=visual)
        t = int(rng.integers(0, len(d.instructions)))
        messages = d.messages()[: 2 * t + 1]
        if paired:
            if t == 0:
                continue
            moral = params.phrasings[0][int(rng.integers(len(params.phrasings[0])))]
            immoral = params.phrasings[2][int(rng.integers(len(params.phrasings[2])))]
            base = messages[:-1]
            pairs.append((len(token_ids), len(token_ids) + 1))
            for text, label in ((moral, 1), (immoral, 0)):
                token_ids.append(encode(base + [{"role": "user", "content": text}], d.item))
                labels.append(label)
                target.append(float("nan"))
            continue
        trace = dialogue_trace(d, params)
        p = float(trace.p_fair[t])
        if 0.5 - margin < p < 0.5 + margin:
            continue
        token_ids.append(encode(messages, d.item))
        labels.append(int(p >= 0.5))
        target.append(float(trace.log_odds[t]))
    labels_arr = np.asarray(labels, dtype=np.int64)
    digest = _digest(token_ids, labels_arr)
    if visual:
        digest = hashlib.sha256((digest + "".join(Path(p).name for p in pictures)).encode()).hexdigest()[:16]
    return ContrastSet(
        name=("organism-visual" if visual else "organism") + ("-pairs" if paired else ""),
        token_ids=token_ids,
        labels=labels_arr,
        pairs=np.asarray(pairs, dtype=np.int64) if paired else None,
        target=np.asarray(target, dtype=np.float64),
        digest=digest,
        margin=None if paired else margin,
        images=pictures if visual else None,
    )


def load_contrast(spec: str, tokenizer: Any, paired: bool, n: int = 2000, fmt: str = "raw", seed: int = ORGANISM_CONTRAST_SEED,
                  margin: float = ORGANISM_MARGIN, processor: Any = None, max_lines: int | None = MAX_CONTRAST_LINES) -> ContrastSet:
    """``organism`` or a JSONL path → a ContrastSet (``paired`` asks the organism for pairs; ``margin``:
    the organism's left-out band around p(fair) = ½, see :func:`organism_contrast`; ``processor``: a
    vision-language model's, for lines with pictures; ``max_lines``: see :func:`read_contrast_file`)."""
    if spec == "organism":
        return organism_contrast(tokenizer, n=n, paired=paired, seed=seed, margin=margin, processor=processor)
    path = Path(spec)
    if not path.exists():
        raise WorkbenchError(f"--contrast: {spec} is neither 'organism' nor an existing JSONL file")
    contrast = load_jsonl_contrast(path, tokenizer, fmt, processor, max_lines)
    if paired and contrast.pairs is None:
        raise WorkbenchError(f"{spec}: this method needs pairs ({{\"positive\": ..., \"negative\": ...}} per line)")
    return contrast


def describe(contrast: ContrastSet) -> dict[str, Any]:
    """Counts for the probe file and the CLI."""
    out = {"name": contrast.name, "n": len(contrast.token_ids), "n_positive": int(contrast.labels.sum()),
           "n_pairs": 0 if contrast.pairs is None else len(contrast.pairs), "digest": contrast.digest}
    if contrast.margin is not None:
        out["margin"] = contrast.margin
    return out
