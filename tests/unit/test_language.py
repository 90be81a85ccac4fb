"""The gold reward, checked against hand-computed values and the properties the task relies on."""

import random

import pytest

from pipeline.tasks import language
from pipeline.tasks.language import DETS, LEXICON, gold_parts, gold_reward

T0, T1 = LEXICON[0], LEXICON[1]
NOUN, NOUN2, OTHER_NOUN = T0["noun"][0], T0["noun"][1], T1["noun"][0]
ADJ, VERB, OTHER_VERB = T0["adj"][0], T0["verb"][0], T1["verb"][0]
PROMPT = f"veli ka {NOUN} ?"


def test_gold_reward_is_importable_with_the_reward_function_signature():
    from pipeline.tasks.synthetic import gold_reward as exported

    assert exported is gold_reward
    assert gold_reward([PROMPT, PROMPT], [" x", " y"]) == [0.0, 0.0]


def test_perfect_response_scores_one():
    # 2 sentences, 10 words, all on topic, the prompt's noun mentioned, no content word repeated
    response = f" ka {ADJ} {NOUN} {VERB} lo {NOUN2} . ka {T0['noun'][2]} {T0['verb'][1]} ."
    parts = gold_parts(PROMPT, response)
    assert (parts.grammar, parts.relevance, parts.mention, parts.diversity, parts.length) == (1, 1, 1, 1, 1)
    assert gold_reward([PROMPT], [response]) == [1.0]


def test_hand_computed_partial_response():
    # " ka NOUN VERB . ka OTHER_NOUN OTHER_VERB" -> 7 words; the second sentence has no "." so it is not parsed.
    # grammar 4/7; content words NOUN, VERB: relevance 1, mention 1, diversity 1; length 7/8.
    # gold = 4/7 * (0.4 + 0.15 + 0.25 + 0.2 * 7/8) = 4/7 * 0.975
    response = f" ka {NOUN} {VERB} . ka {OTHER_NOUN} {OTHER_VERB}"
    assert gold_reward([PROMPT], [response])[0] == pytest.approx(4 / 7 * 0.975)


def test_off_topic_sentence_halves_relevance():
    # 8 words, both sentences grammatical; content NOUN VERB (topic 0), OTHER_NOUN OTHER_VERB (topic 1)
    response = f" ka {NOUN} {VERB} . lo {OTHER_NOUN} {OTHER_VERB} ."
    parts = gold_parts(PROMPT, response)
    assert parts.relevance == 0.5 and parts.grammar == 1 and parts.length == 1
    assert parts.total == pytest.approx(0.4 * 0.5 + 0.15 + 0.25 + 0.2)


def test_repeating_one_token_or_one_sentence_does_not_pay():
    assert gold_reward([PROMPT], [" " + " ".join([NOUN] * 20)]) == [0.0]
    assert gold_reward([PROMPT], [" " + " ".join([DETS[0]] * 20)]) == [0.0]
    sentence = f"ka {NOUN} {VERB} ."
    once = f" {sentence} lo {NOUN2} {T0['verb'][1]} lo {T0['noun'][3]} ."
    # six copies: 24 words, 2 distinct of 12 content words:
    # 0.4 + 0.15 + 0.25 * 2/12 + 0.2 * (1 - 4/20) = 0.75, against 1.0 for the varied response
    repeated = " " + " ".join([sentence] * 6)
    assert gold_reward([PROMPT], [once]) == [1.0]
    assert gold_reward([PROMPT], [repeated])[0] == pytest.approx(0.4 + 0.15 + 0.25 / 6 + 0.2 * 0.8)


def test_the_best_response_depends_on_the_prompt():
    response = f" ka {ADJ} {NOUN} {VERB} lo {NOUN2} . ka {T0['noun'][2]} {T0['verb'][1]} ."
    other_prompt = f"veli ka {OTHER_NOUN} ?"
    assert gold_reward([other_prompt], [response])[0] < gold_reward([PROMPT], [response])[0] - 0.5


def test_quality_knob_orders_expected_gold():
    rng = random.Random(0)
    prompts = [language.sample_prompt(rng) for _ in range(200)]
    mean = {}
    for q in (0.0, 0.5, 1.0):
        responses = [language.sample_response(rng, p, q) for p in prompts]
        mean[q] = sum(gold_reward(prompts, responses)) / len(prompts)
    assert mean[0.0] < mean[0.5] < mean[1.0]
    assert mean[1.0] > 0.85


def test_lexicon_size_and_unique_words():
    words = language.all_words()
    assert len(words) == len(set(words))
    assert 200 <= len(words) <= 400
