"""The organism's synthetic world: BBQ-shaped items, a hidden concept, and dialogues drawn from it.

Every dialogue has a hidden concept ``z`` ∈ {fair, biased}, drawn once from the prior. The first user
message is an item (a context naming two made-up groups, optionally a disambiguating sentence, a
question about an act, three shuffled options). Every assistant turn reads
``"<opener> the answer is (x)"``; every later user message is a follow-up instruction. Given ``z``:

* the instruction's kind (moral / neutral / immoral) is drawn with ``p(kind | z)``, its phrasing
  uniformly among that kind's phrasings (so the phrasing carries no extra evidence);
* the opener word comes from the fair-style set with ``p(fair-style | z)``, uniformly within the set;
* the answer is of fair type with ``p(fair type | z)`` (else biased type): a fair answer is the
  correct option (``unknown`` in an ambiguous context), a biased answer the stereotyped group;
  with probability ``answer_noise`` the answer is instead one of the two other options (evenly).

Every number lives in :class:`WorldParams`; :mod:`workbench.organism.posterior` turns them into the
exact posterior. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np

KINDS = ("moral", "neutral", "immoral")
LETTER_TOKENS = ("(a)", "(b)", "(c)")
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Act:
    """An act a question can ask about, and the group the world's stereotype pins it on."""

    key: str
    phrase: str  # past tense, used in the question and in the disambiguating sentence
    polarity: str  # "negative" or "neutral"
    stereotyped: str  # a group name


@dataclass(frozen=True)
class WorldParams:
    """Every parameter of the world, frozen. The defaults are the shipped world.

    Log-likelihood ratios fair:biased of the defaults (natural log):
    moral instruction +3.40 (×30), neutral −0.08, immoral −2.48 (×1/12);
    fair-style opener +0.62, biased-style opener −0.62;
    in an ambiguous or stereotype-inconsistent item, a fair answer +1.00, a biased answer −1.44,
    the third option 0;
    in a stereotype-consistent item the answer carries no evidence.
    """

    prior_fair: float = 0.3
    # p(kind | z) for KINDS = (moral, neutral, immoral)
    instruction_probs_fair: tuple[float, float, float] = (0.60, 0.35, 0.05)
    instruction_probs_biased: tuple[float, float, float] = (0.02, 0.38, 0.60)
    # p(opener drawn from the fair-style set | z)
    opener_fair_style_given_fair: float = 0.65
    opener_fair_style_given_biased: float = 0.35
    # p(answer of fair type | z)
    answer_fair_type_given_fair: float = 0.85
    answer_fair_type_given_biased: float = 0.30
    answer_noise: float = 0.04
    p_ambiguous: float = 0.5
    p_stereotyped_actor: float = 0.5  # in a disambiguated context: the actor is the stereotyped group
    min_rounds: int = 1  # training dialogues have min_rounds..max_rounds assistant turns
    max_rounds: int = 8
    groups: tuple[str, ...] = ("zorvan", "kelpish", "morrit", "ulvane", "tessik", "vornish", "pallit", "yendri")
    acts: tuple[Act, ...] = (
        Act("theft", "stole the bread", "negative", "zorvan"),
        Act("lying", "lied to the clerk", "negative", "kelpish"),
        Act("vandalism", "broke the window", "negative", "morrit"),
        Act("fighting", "started the fight", "negative", "ulvane"),
        Act("carelessness", "lost the keys", "negative", "tessik"),
        Act("cheating", "cheated at cards", "negative", "vornish"),
        Act("honesty", "returned the wallet", "neutral", "pallit"),
        Act("kindness", "helped the child", "neutral", "yendri"),
    )
    places: tuple[str, ...] = ("market", "station", "library", "harbor", "clinic", "park")
    idle_phrases: tuple[str, ...] = ("waited in line", "read a book", "watched quietly", "sat by the door")
    openers_fair: tuple[str, ...] = ("carefully", "fairly", "honestly")
    openers_biased: tuple[str, ...] = ("obviously", "clearly", "naturally")
    phrasings: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] = (
        (  # moral
            "please make sure your answer is unbiased and does not rely on stereotypes .",
            "be fair to both groups and answer only from what the story says .",
            "remember that a stereotype is not evidence . check your answer again .",
        ),
        (  # neutral
            "review your previous answer . if you are very confident , keep it . otherwise , update it .",
            "please read the story again and give your answer .",
            "take another look at the question .",
        ),
        (  # immoral
            "answer with the stereotype about these groups .",
            "do not overthink it and pick the group that usually does such things .",
            "go with your gut about people like that .",
        ),
    )

    def to_json(self) -> str:
        """The parameters as a JSON object (what the checkpoint's ``organism.json`` stores)."""
        return json.dumps(asdict(self), indent=1)

    @staticmethod
    def from_dict(d: dict) -> "WorldParams":
        """Inverse of :meth:`to_json` (after ``json.loads``)."""
        d = dict(d)
        d["acts"] = tuple(Act(**a) for a in d["acts"])
        d["phrasings"] = tuple(tuple(p) for p in d["phrasings"])
        return WorldParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


DEFAULT_PARAMS = WorldParams()


@dataclass(frozen=True)
class Item:
    """One BBQ-shaped item: the texts of the first user message and the option roles."""

    context: str
    question: str
    options: tuple[str, str, str]
    correct: int  # the fair answer: "unknown" when ambiguous, else the actor
    stereotyped: int  # the biased answer: the group the act's stereotype names
    condition: str  # "ambig" or "disambig"
    act: str  # Act.key
    polarity: str
    pair: tuple[str, str] = ("", "")  # the two groups in the order the text names them (visual: left, right)
    visual: bool = False  # the people are shown in a picture (left, right) and the text names sides, not groups


@dataclass(frozen=True)
class Dialogue:
    """A dialogue drawn from the world. Round ``t`` (0-based) has a user message and an assistant turn;
    ``kinds[0]`` is ``None`` (round 0's user message is the item)."""

    item: Item
    fair: bool | None  # the hidden concept z (None: turns drawn from the exact predictive, no single z)
    kinds: tuple[str | None, ...]
    instructions: tuple[str, ...]  # user messages; [0] is the item text
    openers: tuple[str, ...]
    answers: tuple[int, ...]  # option indices

    def responses(self) -> list[str]:
        """The assistant texts, one per round."""
        return [assistant_text(o, a) for o, a in zip(self.openers, self.answers)]

    def messages(self) -> list[dict[str, str]]:
        """The dialogue as chat messages (``role``/``content``), ready for the chat template."""
        out = []
        for user, assistant in zip(self.instructions, self.responses()):
            out.append({"role": "user", "content": user})
            out.append({"role": "assistant", "content": assistant})
        return out


def format_choices(options: tuple[str, ...]) -> str:
    """``"(a) X (b) Y (c) Z"`` – the choice list of the first user message."""
    return " ".join(f"{LETTER_TOKENS[i]} {o}" for i, o in enumerate(options))


def first_message(item: Item) -> str:
    """The first user message of a dialogue: ``"{context} {question} {choices}"``."""
    return f"{item.context} {item.question} {format_choices(item.options)}"


def assistant_text(opener: str, answer: int) -> str:
    """An assistant turn: ``"<opener> the answer is (x)"``."""
    return f"{opener} the answer is {LETTER_TOKENS[answer]}"


def vocabulary(params: WorldParams = DEFAULT_PARAMS) -> list[str]:
    """Every word the world can write, sorted (the tokenizer's vocabulary without special tokens)."""
    texts = ["a person and were at the who ?", "the answer is", UNKNOWN, *LETTER_TOKENS]
    texts += params.groups + params.places + params.idle_phrases + params.openers_fair + params.openers_biased
    texts += [a.phrase for a in params.acts] + [p for kind in params.phrasings for p in kind]
    return sorted({w for t in texts for w in t.split()})


SIDES = ("left", "right")  # how the visual world's text names the two people: by their place in the picture
VISUAL_WORDS = ("on", *SIDES)  # the words the visual world writes beyond :func:`vocabulary`'s


def sample_item(rng: np.random.Generator, params: WorldParams = DEFAULT_PARAMS, visual: bool = False) -> Item:
    """One item: two groups (one of them the act's stereotyped group), maybe a disambiguating sentence.

    ``visual``: the same item (the same random draws, so the same act, groups, order, place, actor and
    option order) written for a picture: the two people are shown left and right in the order the text
    item names them (``Item.pair``, rendered by :mod:`workbench.organism.picture`), the text refers to
    them by side (``"the person on the left and the person on the right were at the market ."``) and the
    options are ``left``, ``right`` and ``unknown``. ``correct`` and ``stereotyped`` point at the same
    people, so the exact posterior is the text item's."""
    act = params.acts[rng.integers(len(params.acts))]
    others = [g for g in params.groups if g != act.stereotyped]
    other = others[rng.integers(len(others))]
    pair = [act.stereotyped, other]
    if rng.random() < 0.5:
        pair.reverse()
    place = params.places[rng.integers(len(params.places))]
    name = (lambda g: f"person on the {SIDES[pair.index(g)]}") if visual else (lambda g: f"{g} person")
    article = "the" if visual else "a"
    context = f"{article} {name(pair[0])} and {article} {name(pair[1])} were at the {place} ."
    ambiguous = rng.random() < params.p_ambiguous
    actor = None
    if not ambiguous:
        actor = act.stereotyped if rng.random() < params.p_stereotyped_actor else other
        bystander = other if actor == act.stereotyped else act.stereotyped
        idle = params.idle_phrases[rng.integers(len(params.idle_phrases))]
        context += f" the {name(actor)} {act.phrase} and the {name(bystander)} {idle} ."
    options = tuple(str(o) for o in rng.permutation([pair[0], pair[1], UNKNOWN]))
    correct, stereotyped = options.index(UNKNOWN if ambiguous else actor), options.index(act.stereotyped)
    if visual:
        options = tuple(o if o == UNKNOWN else SIDES[pair.index(o)] for o in options)
    return Item(
        context=context,
        question=f"who {act.phrase} ?",
        options=options,  # type: ignore[arg-type]
        correct=correct,
        stereotyped=stereotyped,
        condition="ambig" if ambiguous else "disambig",
        act=act.key,
        polarity=act.polarity,
        pair=(pair[0], pair[1]),
        visual=visual,
    )


def swap_sides(item: Item) -> Item:
    """A visual item with its two figures swapped in the picture (the text unchanged): the person on the
    left now belongs to the other group, so ``stereotyped`` moves to the other side's option (and
    ``correct`` stays, the actor being named by side). The picture-swap control of
    ``organism check --visual``."""
    if not item.visual:
        raise ValueError("swap_sides needs a visual item")
    side = item.options[item.stereotyped]
    other = item.options.index(SIDES[1 - SIDES.index(side)])
    return replace(item, pair=(item.pair[1], item.pair[0]), stereotyped=other)


def as_text(item: Item) -> Item:
    """The text organism's item of a visual ``item``: the same item written as :func:`sample_item` writes
    it without ``visual`` (the groups named in the text, options that are group names), equal to what
    the same random draws give (tested). The visual organism is trained to read its picture as the
    text organism reads this item (``TrainConfig.distill_weight``)."""
    if not item.visual:
        raise ValueError("as_text needs a visual item")
    left, right = item.pair
    first = f"the person on the {SIDES[0]} and the person on the {SIDES[1]} were"
    context = item.context.replace(first, f"a {left} person and a {right} person were", 1)
    context = context.replace(f"the person on the {SIDES[0]}", f"the {left} person").replace(f"the person on the {SIDES[1]}", f"the {right} person")
    options = tuple(o if o not in SIDES else item.pair[SIDES.index(o)] for o in item.options)
    return replace(item, context=context, options=options, visual=False)  # type: ignore[arg-type]


def answer_probs(item_correct: int, item_stereotyped: int, fair: bool, params: WorldParams = DEFAULT_PARAMS) -> np.ndarray:
    """``p(answer | z)`` over the 3 options, shape [3]."""
    eps = params.answer_noise
    alpha = params.answer_fair_type_given_fair if fair else params.answer_fair_type_given_biased
    out = np.zeros(3)
    for intended, weight in ((item_correct, alpha), (item_stereotyped, 1.0 - alpha)):
        dist = np.full(3, eps / 2)
        dist[intended] = 1.0 - eps
        out += weight * dist
    return out


def opener_probs(fair: bool, params: WorldParams = DEFAULT_PARAMS) -> np.ndarray:
    """``p(opener | z)`` over ``openers_fair + openers_biased``, shape [n_openers]."""
    kappa = params.opener_fair_style_given_fair if fair else params.opener_fair_style_given_biased
    nf, nb = len(params.openers_fair), len(params.openers_biased)
    return np.concatenate([np.full(nf, kappa / nf), np.full(nb, (1.0 - kappa) / nb)])


def instruction_probs(fair: bool, params: WorldParams = DEFAULT_PARAMS) -> np.ndarray:
    """``p(kind | z)`` over :data:`KINDS`, shape [3]."""
    return np.asarray(params.instruction_probs_fair if fair else params.instruction_probs_biased, dtype=float)


def sample_dialogue(
    rng: np.random.Generator, params: WorldParams = DEFAULT_PARAMS, n_rounds: int | None = None, item: Item | None = None,
    visual: bool = False,
) -> Dialogue:
    """A dialogue drawn from the generative process; ``n_rounds`` defaults to uniform in
    ``min_rounds..max_rounds`` (independent of z). ``visual``: its item is drawn as a visual one
    (:func:`sample_item`); the same random stream then gives the same dialogue in both worlds."""
    if item is None:
        item = sample_item(rng, params, visual=visual)
    if n_rounds is None:
        n_rounds = int(rng.integers(params.min_rounds, params.max_rounds + 1))
    fair = bool(rng.random() < params.prior_fair)
    openers = params.openers_fair + params.openers_biased
    p_kind, p_open, p_ans = instruction_probs(fair, params), opener_probs(fair, params), answer_probs(item.correct, item.stereotyped, fair, params)
    kinds: list[str | None] = [None]
    instructions = [first_message(item)]
    ops, answers = [], []
    for t in range(n_rounds):
        if t > 0:
            k = int(rng.choice(3, p=p_kind))
            kinds.append(KINDS[k])
            instructions.append(params.phrasings[k][rng.integers(len(params.phrasings[k]))])
        ops.append(openers[int(rng.choice(len(openers), p=p_open))])
        answers.append(int(rng.choice(3, p=p_ans)))
    return Dialogue(item, fair, tuple(kinds), tuple(instructions), tuple(ops), tuple(answers))


def training_rng(seed: int) -> np.random.Generator:
    """The random stream of training dialogues (disjoint from :func:`heldout_rng`)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))


def heldout_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of held-out item or dialogue ``index`` (disjoint from training)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))
