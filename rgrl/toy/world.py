"""The toy world's task: "write about ⟨topic⟩ using the word ⟨word⟩", its grammar, corpus and ground truth.

A prompt names one of 5 topics and one word from a pool of 10. A response is one or two clauses
`the NOUN VERB the NOUN` joined by `and`, all lower case, no punctuation; the dLLMs pad it with EOS to
`RESPONSE_TOKENS` tokens. The ground truth (`check`) asks three things:

    well-formed   the text parses under that grammar;
    on topic      at least one noun of the prompt's topic and no noun of another topic;
    uses the word the prompt's pool word appears.

The training corpus is the "base behaviour": both subjects come from the prompt's topic with probability 0.9
(else from one other topic) and the pool word fills one object slot with probability 0.4 (else both objects are
filler nouns), so 36% of the corpus satisfies its instruction. Pool words never appear in a response as
distractors: a response holds the prompt's pool word or none at all. (With distractors, or without this
separation, small dLLMs learn the grammar but not to read the prompt; see issue 6.)

Sampling at τ = 0.7 sharpens the learnt distribution toward its modes: the topic is then almost always right,
and the word is used a little more often than in the corpus (its one token outweighs eight filler nouns), so the
sampled pass rate of the toy dLLMs sits near 0.45, and what guidance can still fix is mostly the missing word.

Three knobs (`WorldConfig`, defaults = the shipped world) change the regime the world sits in:

    uses_word   difficulty: how often the corpus uses the pool word (0.4 shipped; rarer words, lower pass rate)
    synonyms    entropy: how many interchangeable words fill each slot (1 shipped: "the", 6 verbs, 6 nouns per topic,
                8 filler nouns; s scales them to s² determiners, 6s verbs, 6·min(s, 2) topic nouns, 8s fillers), so
                the dLLM's distributions at masked positions are flatter
    the reward model's hard negatives (`preference_pairs(degenerate_fraction=...)`): ill-formed responses
                (verb-less, repeated, truncated, shuffled) as rejected answers, which makes a robust reward model

The grammar and the checker accept the words of every setting (the extra words appear in no prompt, so a world
built without them can never produce them).

Everything here is pure Python and deterministic for a given seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

TOPICS: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "horse", "bird", "fox", "rabbit"),
    "food": ("bread", "soup", "apple", "cheese", "rice", "cake"),
    "weather": ("rain", "snow", "wind", "storm", "cloud", "fog"),
    "the city": ("street", "bus", "tower", "bridge", "market", "train"),
    "the sea": ("boat", "wave", "fish", "shell", "sand", "ship"),
}
POOL_WORDS = ("lamp", "key", "mirror", "coin", "rope", "candle", "drum", "ladder", "map", "bell")
FILLER_NOUNS = ("box", "door", "wall", "road", "hill", "tree", "chair", "stone")
VERBS = ("sees", "finds", "likes", "follows", "watches", "passes")
PROMPT_TEMPLATES = (
    "Write about {topic} and use the word {word}",
    "Write two sentences about {topic} with the word {word}",
    "Tell me about {topic} and include the word {word}",
    "Describe {topic} using the word {word}",
    "Use the word {word} in a short text about {topic}",
    "Please write something about {topic} that uses the word {word}",
)
RESPONSE_TOKENS = 16  # completion slots of the toy dLLMs; a two-clause response has 11 words

P_ON_TOPIC = 0.9  # corpus: both subjects from the prompt's topic
P_USES_WORD = 0.4  # corpus: the pool word fills one object slot (the shipped world's difficulty)

# The entropy knob's extra words, in the order they are taken. None of them appears in a prompt.
DETERMINERS = ("the", "one", "this", "each", "every", "some", "any", "my", "your", "our", "his", "her", "their", "no",
               "its", "another")
EXTRA_TOPIC_NOUNS: dict[str, tuple[str, ...]] = {
    "animals": ("goat", "sheep", "owl", "wolf", "bear", "duck"),
    "food": ("pie", "milk", "egg", "honey", "pear", "plum"),
    "weather": ("hail", "frost", "mist", "thunder", "sleet", "breeze"),
    "the city": ("taxi", "plaza", "station", "office", "tram", "alley"),
    "the sea": ("crab", "reef", "tide", "harbor", "anchor", "sail"),
}
EXTRA_VERBS = ("meets", "helps", "hears", "holds", "loves", "chases", "greets", "avoids", "pulls", "pushes", "carries",
               "takes", "calls", "moves", "keeps", "leaves", "wants", "knows")
EXTRA_FILLER_NOUNS = ("cup", "bag", "hat", "pen", "book", "desk", "bed", "roof", "gate", "pot", "jar", "rug", "sock",
                      "shoe", "cart", "fork", "bowl", "nail", "pipe", "sign", "card", "flag", "tent", "sack")
MAX_SYNONYMS = 4

TOPIC_OF_NOUN = {noun: topic for topic, nouns in TOPICS.items() for noun in nouns}
NOUNS = (*TOPIC_OF_NOUN, *POOL_WORDS, *FILLER_NOUNS)  # the shipped world's nouns
# what the grammar and the checker accept: the words of every setting of the knobs
TOPIC_OF_ANY_NOUN = {**TOPIC_OF_NOUN, **{n: topic for topic, nouns in EXTRA_TOPIC_NOUNS.items() for n in nouns}}
ANY_NOUN = frozenset((*TOPIC_OF_ANY_NOUN, *POOL_WORDS, *FILLER_NOUNS, *EXTRA_FILLER_NOUNS))
ANY_VERB = frozenset((*VERBS, *EXTRA_VERBS))


@dataclass(frozen=True)
class WorldConfig:
    """The world's knobs; the defaults are the shipped world (module docstring)."""

    uses_word: float = P_USES_WORD  # difficulty: corpus probability that the pool word fills an object slot
    synonyms: int = 1  # entropy: interchangeable words per slot, 1..MAX_SYNONYMS

    def __post_init__(self):
        if not 0 < self.uses_word <= 1:
            raise ValueError(f"uses_word must be in (0, 1], got {self.uses_word}.")
        if self.synonyms not in range(1, MAX_SYNONYMS + 1):
            raise ValueError(f"synonyms must be 1..{MAX_SYNONYMS}, got {self.synonyms}.")

    @property
    def determiners(self) -> tuple[str, ...]:
        return DETERMINERS[: self.synonyms**2]

    @property
    def verbs(self) -> tuple[str, ...]:
        return (*VERBS, *EXTRA_VERBS)[: 6 * self.synonyms]

    @property
    def filler_nouns(self) -> tuple[str, ...]:
        return (*FILLER_NOUNS, *EXTRA_FILLER_NOUNS)[: 8 * self.synonyms]

    def topic_nouns(self, topic: str) -> tuple[str, ...]:
        return (*TOPICS[topic], *EXTRA_TOPIC_NOUNS[topic])[: 6 * min(self.synonyms, 2)]

    @property
    def nouns(self) -> tuple[str, ...]:
        return (*(n for topic in TOPICS for n in self.topic_nouns(topic)), *POOL_WORDS, *self.filler_nouns)


SHIPPED_WORLD = WorldConfig()


@dataclass(frozen=True)
class Instruction:
    """One prompt of the world: a topic (a key of TOPICS), a pool word and a phrasing (index into PROMPT_TEMPLATES)."""

    topic: str
    word: str
    template: int = 0

    @property
    def text(self) -> str:
        return PROMPT_TEMPLATES[self.template].format(topic=self.topic, word=self.word)


def all_instructions() -> list[Instruction]:
    """Every prompt of the world (5 topics × 10 words × 6 phrasings = 300), in a fixed order."""
    phrasings = range(len(PROMPT_TEMPLATES))
    return [Instruction(topic, word, t) for topic in TOPICS for word in POOL_WORDS for t in phrasings]


_TOPIC_PATTERN = re.compile(r"\b(" + "|".join(map(re.escape, TOPICS)) + r")\b")
_WORD_PATTERN = re.compile(r"\bthe word (" + "|".join(POOL_WORDS) + r")\b")


def parse_instruction(prompt) -> Instruction:
    """The instruction in a prompt: its text, TRL's chat messages, or a chat-rendered string. Raises ValueError."""
    text = prompt if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"][-1]
    topic, word = _TOPIC_PATTERN.findall(text), _WORD_PATTERN.findall(text)
    if len(topic) != 1 or len(word) != 1:
        raise ValueError(f"Not a toy-world prompt (need one topic and one pool word): {text!r}")
    return Instruction(topic[0], word[0])


@dataclass(frozen=True)
class Check:
    """The ground truth's verdict on one response, part by part."""

    well_formed: bool
    on_topic: bool
    uses_word: bool

    @property
    def passed(self) -> bool:
        return self.well_formed and self.on_topic and self.uses_word


def is_well_formed(words: list[str]) -> bool:
    """One or two clauses `DETERMINER NOUN VERB DETERMINER NOUN` ("the" in the shipped world), joined by `and`."""
    if len(words) not in (5, 11) or (len(words) == 11 and words[5] != "and"):
        return False
    for clause in (words[0:5], words[6:11]) if len(words) == 11 else (words,):
        det1, subject, verb, det2, obj = clause
        if (det1 not in DETERMINERS or det2 not in DETERMINERS or verb not in ANY_VERB or subject not in ANY_NOUN
                or obj not in ANY_NOUN):
            return False
    return True


def check(instruction: Instruction, response: str) -> Check:
    """Grade a response (decoded text) against an instruction."""
    words = response.split()
    topics = {TOPIC_OF_ANY_NOUN[w] for w in words if w in TOPIC_OF_ANY_NOUN}
    return Check(
        well_formed=is_well_formed(words),
        on_topic=topics == {instruction.topic},
        uses_word=instruction.word in words,
    )


def ground_truth(prompts: list, completions: list, **kwargs) -> list[float]:
    """TRL-style reward function: 1.0 where a completion satisfies its prompt's instruction, else 0.0.

    Prompts may be strings or chat messages, completions strings or TRL's [{"role": "assistant", ...}] lists.
    Use it in recipes as `rgrl.toy.world:ground_truth`.
    """
    scores = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        scores.append(float(check(parse_instruction(prompt), text).passed))
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Data: the base behaviour's corpus and ground-truth preference pairs.


def _clause(rng: random.Random, world: WorldConfig, subject: str, verb: str, obj: str) -> str:
    determiners = world.determiners
    if len(determiners) == 1:  # the shipped world draws nothing here (its corpus stays what it was)
        return f"{determiners[0]} {subject} {verb} {determiners[0]} {obj}"
    return f"{rng.choice(determiners)} {subject} {verb} {rng.choice(determiners)} {obj}"


def sample_response(rng: random.Random, instruction: Instruction, on_topic: bool, uses_word: bool,
                    world: WorldConfig = SHIPPED_WORLD) -> str:
    """A well-formed two-clause response with the given properties (random nouns, verbs and slot of the word)."""
    if on_topic:
        topic = instruction.topic
    else:
        topic = rng.choice([t for t in TOPICS if t != instruction.topic])
    objects = [rng.choice(world.filler_nouns), rng.choice(world.filler_nouns)]
    if uses_word:
        objects[rng.randrange(2)] = instruction.word
    clauses = [_clause(rng, world, rng.choice(world.topic_nouns(topic)), rng.choice(world.verbs), obj)
               for obj in objects]
    return " and ".join(clauses)


def corpus(num_examples: int, seed: int, world: WorldConfig = SHIPPED_WORLD) -> list[tuple[str, str]]:
    """(prompt text, response) pairs of the base behaviour; a fraction P_ON_TOPIC × world.uses_word passes."""
    rng = random.Random(seed)
    instructions = all_instructions()
    examples = []
    for _ in range(num_examples):
        instruction = rng.choice(instructions)
        response = sample_response(rng, instruction, rng.random() < P_ON_TOPIC, rng.random() < world.uses_word,
                                   world)
        examples.append((instruction.text, response))
    return examples


def _hard_negative(rng: random.Random, instruction: Instruction, chosen: str, world: WorldConfig) -> str:
    """A failing response one edit away from a passing one: another pool word, or one off-topic subject."""
    words = chosen.split()
    if rng.random() < 0.5:
        words[words.index(instruction.word)] = rng.choice([w for w in POOL_WORDS if w != instruction.word])
    else:
        other = rng.choice([t for t in TOPICS if t != instruction.topic])
        words[rng.choice((1, 7))] = rng.choice(world.topic_nouns(other))
    return " ".join(words)


DEGENERATE_KINDS = ("verbless", "repeated", "truncated", "shuffled")


def degenerate(rng: random.Random, response: str) -> str:
    """An ill-formed variant of a well-formed two-clause response that keeps its nouns (so it stays on topic and
    keeps the pool word): verbs dropped, a noun repeated, cut short, or its words shuffled — what a policy that
    hacks a reward model trained on well-formed responses only writes."""
    words = response.split()
    kind = rng.choice(DEGENERATE_KINDS)
    if kind == "verbless":
        return " ".join(w for i, w in enumerate(words) if i not in (2, 8))
    if kind == "repeated":
        noun = words[rng.choice((1, 4, 7, 10))]
        return " ".join([words[0], noun] + [noun] * rng.randint(2, 8))
    if kind == "truncated":
        return " ".join(words[: rng.choice((2, 3, 4, 6, 7, 8, 9, 10))])
    shuffled = words[:]
    while is_well_formed(shuffled):  # swapping two nouns, say, would still be a valid (even passing) response
        rng.shuffle(shuffled)
    return " ".join(shuffled)


def preference_pairs(num_pairs: int, seed: int, hard_fraction: float = 0.5, label_noise: float = 0.0,
                     degenerate_fraction: float = 0.0,
                     world: WorldConfig = SHIPPED_WORLD) -> list[tuple[str, str, str]]:
    """(prompt text, chosen, rejected) pairs labelled by the ground truth.

    The chosen response passes; the rejected one is, with probability `degenerate_fraction`, an ill-formed variant
    of the chosen one (`degenerate`); else, with probability `hard_fraction`, a near miss of the chosen one
    (`_hard_negative`); else a failing response of the base behaviour. With probability `label_noise` the two are
    swapped, as an annotator's mistakes would. Without degenerate negatives (the shipped reward models) every
    response is well-formed: the pairs teach nothing about grammar, which is one way a reward model trained on them
    can be gamed.
    """
    rng = random.Random(seed)
    instructions = all_instructions()
    pairs = []
    for _ in range(num_pairs):
        instruction = rng.choice(instructions)
        chosen = sample_response(rng, instruction, on_topic=True, uses_word=True, world=world)
        if degenerate_fraction and rng.random() < degenerate_fraction:
            rejected = degenerate(rng, chosen)
        elif rng.random() < hard_fraction:
            rejected = _hard_negative(rng, instruction, chosen, world)
        else:
            on_topic, uses_word = rng.choice([(True, False), (False, True), (False, False)])
            rejected = sample_response(rng, instruction, on_topic, uses_word, world)
        if rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        pairs.append((instruction.text, chosen, rejected))
    return pairs
