"""A reward the synthetic task never defined: the share of determiners that are "lo" rather than "ka"."""


def lo_share(prompts: list[str], responses: list[str]) -> list[float]:
    out = []
    for response in responses:
        dets = [w for w in response.split() if w in ("ka", "lo")]
        out.append(sum(w == "lo" for w in dets) / len(dets) if dets else 0.0)
    return out


def nan_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A broken reward: NaN for every response (the learners must skip such steps, then the run must stop)."""
    return [float("nan")] * len(responses)
