"""A small artificial language and its hidden gold reward.

The language is fixed (built from a constant seed), so `gold_reward` needs no task directory and means the same
thing in every run. Only the data sampled from it depends on `--seed`.

Lexicon: 8 topics, each with 12 nouns, 8 adjectives and 6 verbs (208 content words), 2 determiners, 4 question
words and the marks "." and "?". Words are made-up two-syllable strings ("bamo", "tiru").

Grammar of a sentence:  DET [ADJ] NOUN VERB [DET [ADJ] NOUN] "."
A prompt:               ASK DET [ADJ] NOUN "?"     e.g. "veli ka bamo ?"  (the NOUN is the prompt's subject)
A response:             one or more sentences, text starting with a space, e.g. " ka tiru bamo selu ."

Gold reward of (prompt, response), in [0, 1]:
    grammar   = share of the response's words that lie in well-formed sentences
    relevance = share of content words (in well-formed sentences) from the topic of the prompt's noun
    mention   = 1 if the prompt's noun appears in a well-formed sentence, else 0
    diversity = distinct content words / content words
    length    = 1 for 8..20 words, rising linearly from 0 below 8, falling linearly to 0 at 40
    gold      = grammar * (0.4 relevance + 0.15 mention + 0.25 diversity + 0.2 length)
Grammar multiplies everything, so word salad scores 0; diversity and length make one repeated sentence or
token a poor strategy; relevance and mention make the best response depend on the prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NUM_TOPICS = 8
PER_TOPIC = {"noun": 12, "adj": 8, "verb": 6}
DETS = ("ka", "lo")
ASKS = ("veli", "sono", "pira", "dume")
MIN_GOOD_WORDS, MAX_GOOD_WORDS, MAX_WORDS = 8, 20, 40

_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()


def _make_lexicon() -> tuple[dict[str, tuple[str, int]], list[dict[str, list[str]]]]:
    rng = random.Random(20261122)
    taken = set(DETS) | set(ASKS)
    words_by_topic: list[dict[str, list[str]]] = [{kind: [] for kind in PER_TOPIC} for _ in range(NUM_TOPICS)]
    info: dict[str, tuple[str, int]] = {}
    for topic in range(NUM_TOPICS):
        for kind, count in PER_TOPIC.items():
            while len(words_by_topic[topic][kind]) < count:
                word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2))
                if word not in taken:
                    taken.add(word)
                    words_by_topic[topic][kind].append(word)
                    info[word] = (kind, topic)
    return info, words_by_topic


WORD_INFO, LEXICON = _make_lexicon()
"""WORD_INFO: content word -> (kind, topic); LEXICON[topic][kind] -> words."""


@dataclass(frozen=True)
class GoldParts:
    grammar: float
    relevance: float
    mention: float
    diversity: float
    length: float

    @property
    def total(self) -> float:
        rest = 0.4 * self.relevance + 0.15 * self.mention + 0.25 * self.diversity + 0.2 * self.length
        return self.grammar * rest


def prompt_subject(prompt: str) -> str | None:
    """The prompt's noun: the last noun before "?" (None for text outside the language)."""
    nouns = [w for w in prompt.split() if WORD_INFO.get(w, ("", -1))[0] == "noun"]
    return nouns[-1] if nouns else None


def _is_sentence(words: list[str]) -> bool:
    """DET [ADJ] NOUN VERB [DET [ADJ] NOUN], without the final "."."""
    kinds = ["det" if w in DETS else WORD_INFO.get(w, ("?", -1))[0] for w in words]
    i = 0

    def noun_phrase() -> bool:
        nonlocal i
        if i < len(kinds) and kinds[i] == "det":
            i += 1
            if i < len(kinds) and kinds[i] == "adj":
                i += 1
            if i < len(kinds) and kinds[i] == "noun":
                i += 1
                return True
        return False

    if not noun_phrase() or i >= len(kinds) or kinds[i] != "verb":
        return False
    i += 1
    return i == len(kinds) or (noun_phrase() and i == len(kinds))


def gold_parts(prompt: str, response: str) -> GoldParts:
    words = response.split()
    good: list[str] = []
    current: list[str] = []
    for w in words:
        if w == ".":
            if _is_sentence(current):
                good.extend(current + ["."])
            current = []
        else:
            current.append(w)
    subject = prompt_subject(prompt)
    topic = WORD_INFO[subject][1] if subject else -1
    content = [w for w in good if w in WORD_INFO]
    n = len(words)
    if n < MIN_GOOD_WORDS:
        length = n / MIN_GOOD_WORDS
    elif n <= MAX_GOOD_WORDS:
        length = 1.0
    else:
        length = max(0.0, 1 - (n - MAX_GOOD_WORDS) / (MAX_WORDS - MAX_GOOD_WORDS))
    return GoldParts(
        grammar=len(good) / n if n else 0.0,
        relevance=sum(WORD_INFO[w][1] == topic for w in content) / len(content) if content else 0.0,
        mention=float(subject is not None and subject in good),
        diversity=len(set(content)) / len(content) if content else 0.0,
        length=length,
    )


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The hidden gold reward (module docstring), with the reward-function signature of DESIGN.md."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(responses)} responses")
    return [gold_parts(p, r).total for p, r in zip(prompts, responses, strict=True)]


def sample_prompt(rng: random.Random) -> str:
    topic = rng.randrange(NUM_TOPICS)
    adj = [rng.choice(LEXICON[rng.randrange(NUM_TOPICS)]["adj"])] if rng.random() < 0.5 else []
    return " ".join([rng.choice(ASKS), rng.choice(DETS), *adj, rng.choice(LEXICON[topic]["noun"]), "?"])


def sample_response(rng: random.Random, prompt: str, quality: float) -> str:
    """A response whose expected gold rises with `quality` in [0, 1]: on-topic words, the prompt's noun,
    intact grammar and a good length all become likelier."""
    subject = prompt_subject(prompt)
    topic = WORD_INFO[subject][1] if subject else rng.randrange(NUM_TOPICS)

    def pick(kind: str) -> str:
        t = topic if rng.random() < quality else rng.randrange(NUM_TOPICS)
        return rng.choice(LEXICON[t][kind])

    def noun_phrase(noun: str) -> list[str]:
        return [rng.choice(DETS), *([pick("adj")] if rng.random() < 0.5 else []), noun]

    n_sentences = rng.choice((2, 3)) if rng.random() < quality else rng.choice((1, 2, 3, 4, 5))
    sentences = []
    for i in range(n_sentences):
        subj = subject if (i == 0 and subject and rng.random() < quality) else pick("noun")
        words = noun_phrase(subj) + [pick("verb")]
        if rng.random() < 0.6:
            words += noun_phrase(pick("noun"))
        if rng.random() > quality:
            # A careless rater's text: a dropped or swapped word breaks the sentence.
            j = rng.randrange(len(words))
            words = words[:j] + words[j + 1 :] if rng.random() < 0.5 else rng.sample(words, len(words))
        sentences.append(" ".join(words) + " .")
    return " " + " ".join(sentences)


def all_words() -> list[str]:
    return [*DETS, *ASKS, *WORD_INFO, ".", "?"]
