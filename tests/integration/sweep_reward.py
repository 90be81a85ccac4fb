"""Rewards of known sign for the sweep tests: `words` is always >= 1 and `minus_words` always <= -1, so a trial
optimizing `minus_words` is worse at every step and ASHA must stop it at its first rung."""


def words(prompts: list[str], responses: list[str]) -> list[float]:
    return [1.0 + len(r.split()) for r in responses]


def minus_words(prompts: list[str], responses: list[str]) -> list[float]:
    return [-x for x in words(prompts, responses)]
