"""RewardWorker as a plain class: reward model(s) against a direct transformers forward, the reward function,
the weighted sum, the uncertainty penalty, config errors, and the HTTP scorer against a local test server."""

import contextlib
import json
import pickle
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from actors.reward import RemoteRewardError, RewardError, RewardWorker
from actors.scoring import reward_model_inputs, reward_model_scores, reward_model_text
from pipeline.config import RewardConfig, load_config
from pipeline.errors import ConfigError
from pipeline.tasks.synthetic import gold_reward
from pipeline.tasks.tiny_models import build_reward_model
from tests.unit.test_reference_worker import rollouts_of, sample_texts

GOLD = "pipeline.tasks.synthetic:gold_reward"
TEMPLATE = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
PROMPTS, RESPONSES = sample_texts(6, seed=3)


@pytest.fixture(scope="module")
def reward_dir(task_dir):
    return task_dir / "models/reward"


@pytest.fixture(scope="module")
def second_reward_dir(reward_dir, tmp_path_factory):
    """A second, differently initialized member for ensemble tests."""
    out = tmp_path_factory.mktemp("reward2")
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    build_reward_model(tokenizer, hidden_size=64, layers=1, seed=11).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def templated_reward_dir(reward_dir, tmp_path_factory):
    """The same reward model with a tokenizer that has a chat template."""
    out = tmp_path_factory.mktemp("reward_templated") / "m"
    shutil.copytree(reward_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def direct_scores(model_dir, texts: list[str], add_special_tokens: bool = True) -> torch.Tensor:
    """What anyone with transformers computes: one unpadded text at a time, the single logit."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return torch.tensor(
            [
                model(**tokenizer(t, return_tensors="pt", add_special_tokens=add_special_tokens)).logits[0, 0].item()
                for t in texts
            ]
        )


def concat(prompts, responses):
    return [p + r for p, r in zip(prompts, responses, strict=True)]


def worker(cfg: RewardConfig, model_dirs=()) -> RewardWorker:
    w = RewardWorker(cfg, model_dirs)
    w.setup()
    return w


# --- the reward-model input convention ---


def test_text_is_the_concatenation_without_a_chat_template(reward_dir):
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    assert not tokenizer.chat_template
    assert reward_model_text(tokenizer, "veli ka bamo ?", " ka tiru .") == "veli ka bamo ? ka tiru ."
    ids = reward_model_inputs(tokenizer, ["veli ka bamo ?"], [" ka tiru ."])["input_ids"][0].tolist()
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_text_uses_the_chat_template_when_there_is_one(templated_reward_dir):
    tokenizer = AutoTokenizer.from_pretrained(templated_reward_dir)
    text = reward_model_text(tokenizer, "veli ka bamo ?", " ka tiru .")
    assert text == "<|bos|><user>veli ka bamo ?<assistant> ka tiru ."
    ids = reward_model_inputs(tokenizer, ["veli ka bamo ?"], [" ka tiru ."])["input_ids"][0].tolist()
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, not a second one from the tokenizer


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_a_score(reward_dir, side):
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    tokenizer.padding_side = side
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    enc = reward_model_inputs(tokenizer, PROMPTS, RESPONSES)
    assert not enc["attention_mask"].bool().all()  # the batch is really padded
    with torch.no_grad():
        batched = reward_model_scores(model, enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(batched, direct_scores(reward_dir, concat(PROMPTS, RESPONSES)), atol=1e-5, rtol=0)


# --- reward models ---


def test_model_scores_equal_a_direct_forward(reward_dir):
    got = worker(RewardConfig(micro_batch_size=4), [reward_dir]).score_texts(PROMPTS, RESPONSES)
    want = direct_scores(reward_dir, concat(PROMPTS, RESPONSES))
    assert want.std() > 0  # the scores tell the samples apart, so a mix-up would show
    torch.testing.assert_close(got.scores, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.model_mean, want, atol=1e-5, rtol=0)
    assert got.scores.dtype == torch.float32 and (got.model_std == 0).all() and set(got.parts) == {"model"}


def test_model_with_a_chat_template_scores_the_templated_text(templated_reward_dir):
    tokenizer = AutoTokenizer.from_pretrained(templated_reward_dir)
    texts = [reward_model_text(tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert texts[0].startswith("<|bos|><user>")
    got = worker(RewardConfig(), [templated_reward_dir]).score_texts(PROMPTS, RESPONSES)
    want = direct_scores(templated_reward_dir, texts, add_special_tokens=False)
    torch.testing.assert_close(got.scores, want, atol=1e-5, rtol=0)


def test_ensemble_mean_std_and_uncertainty_penalty(reward_dir, second_reward_dir):
    got = worker(RewardConfig(uncertainty_penalty=0.5), [reward_dir, second_reward_dir]).score_texts(PROMPTS, RESPONSES)
    s1 = direct_scores(reward_dir, concat(PROMPTS, RESPONSES))
    s2 = direct_scores(second_reward_dir, concat(PROMPTS, RESPONSES))
    mean, std = (s1 + s2) / 2, (s1 - s2).abs() / 2  # population std of two values
    assert (std > 1e-3).all()
    torch.testing.assert_close(got.model_mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.model_std, std, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.scores, mean - 0.5 * std, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.parts["model"], got.scores)


def test_loading_new_reward_models_changes_the_scores_in_place(reward_dir, second_reward_dir):
    w = worker(RewardConfig(function=GOLD), [reward_dir])
    before = w.score_texts(PROMPTS, RESPONSES)
    w.load_reward_models([second_reward_dir])
    after = w.score_texts(PROMPTS, RESPONSES)
    torch.testing.assert_close(
        after.parts["model"], direct_scores(second_reward_dir, concat(PROMPTS, RESPONSES)), atol=1e-5, rtol=0
    )
    assert not torch.allclose(before.parts["model"], after.parts["model"])
    torch.testing.assert_close(after.parts["function"], before.parts["function"])  # the other sources stay
    with pytest.raises(ValueError, match="reward-model dirs"):
        worker(RewardConfig(function=GOLD)).load_reward_models([second_reward_dir])


# --- reward function and weights ---


def test_function_scorer_calls_gold_reward(reward_dir):
    w = worker(RewardConfig(function=GOLD))
    got = w.score_texts(PROMPTS, RESPONSES)
    want = torch.tensor(gold_reward(PROMPTS, RESPONSES))
    assert want.std() > 0
    torch.testing.assert_close(got.scores, want)
    torch.testing.assert_close(got.parts["function"], want)
    assert got.model_mean is None and got.model_std is None
    rollouts = rollouts_of(AutoTokenizer.from_pretrained(reward_dir), PROMPTS, RESPONSES)
    torch.testing.assert_close(w.score(rollouts).scores, want)


def test_weighted_sum_of_model_function_and_url(reward_dir):
    with reward_server(lengths) as (url, seen):
        cfg = RewardConfig(function=GOLD, url=url, weights={"model": 0.5, "function": 2.0, "url": -0.1})
        got = worker(cfg, [reward_dir]).score_texts(PROMPTS, RESPONSES)
    model = direct_scores(reward_dir, concat(PROMPTS, RESPONSES))
    gold = torch.tensor(gold_reward(PROMPTS, RESPONSES))
    length = torch.tensor([float(len(r)) for r in RESPONSES])
    torch.testing.assert_close(got.scores, 0.5 * model + 2.0 * gold - 0.1 * length, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.parts["url"], length)
    assert set(got.parts) == {"model", "function", "url"} and len(seen) == 1


def test_unlisted_sources_weigh_one(reward_dir):
    got = worker(RewardConfig(function=GOLD, weights={"function": 3.0}), [reward_dir]).score_texts(PROMPTS, RESPONSES)
    torch.testing.assert_close(got.scores, got.parts["model"] + 3.0 * got.parts["function"])


def test_empty_batch_gives_empty_scores(reward_dir):
    got = worker(RewardConfig(function=GOLD), [reward_dir]).score_texts([], [])
    assert got.scores.shape == (0,) and got.model_mean.shape == (0,)


# --- errors ---


@pytest.mark.parametrize(
    "spec, says",
    [
        ("no_such_module_xyz:f", "No module named"),
        ("pipeline.tasks.synthetic:no_such_function", "no_such_function"),
        ("pipeline.tasks.synthetic:DEMO_CANDIDATES", "not a function"),
    ],
)
def test_bad_function_is_a_config_error_naming_the_key(spec, says):
    with pytest.raises(ConfigError, match="reward.function") as info:
        worker(RewardConfig(function=spec))
    assert says in str(info.value)


def short_reward(prompts, responses):
    return [0.0] * (len(prompts) - 1)


def nan_reward(prompts, responses):
    return [float("nan")] * len(prompts)


def text_reward(prompts, responses):
    return ["1.0"] * len(prompts)


@pytest.mark.parametrize(
    "name, says",
    [("short_reward", "returned 5 rewards for 6"), ("text_reward", "'1.0'")],
)
def test_function_returning_bad_values_is_a_clear_error(name, says):
    w = worker(RewardConfig(function=f"tests.unit.test_reward_worker:{name}"))
    with pytest.raises(RewardError, match="reward.function") as info:
        w.score_texts(PROMPTS, RESPONSES)
    assert says in str(info.value)


def test_non_finite_rewards_pass_through_for_the_learners_to_skip():
    w = worker(RewardConfig(function="tests.unit.test_reward_worker:nan_reward"))
    assert torch.isnan(w.score_texts(PROMPTS, RESPONSES).scores).all()


def test_no_source_is_a_config_error():
    with pytest.raises(ConfigError, match="no reward source"):
        worker(RewardConfig())
    with pytest.raises(ConfigError, match="'model'"):
        worker(RewardConfig(function=GOLD, weights={"model": 1.0}))


@pytest.mark.parametrize(
    "override, says",
    [
        ("reward.weights={url: 2}", "reward.url is not set"),
        ("reward.weights={function: .inf}", "must be finite"),
        ("reward.weights={bogus: 1}", "'model', 'function' or 'url'"),
        ("reward.url=localhost:8000", "should match pattern"),
    ],
)
def test_bad_reward_config_names_the_key(override, says):
    with pytest.raises(ConfigError, match=override.split("=")[0]) as info:
        load_config(None, [override])
    assert says in str(info.value)


# --- the HTTP scorer against a local server ---


def send(handler, code: int, body: bytes) -> None:
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def lengths(handler, body):
    send(handler, 200, json.dumps({"rewards": [float(len(r)) for r in body["responses"]]}).encode())


def too_slow(handler, body):
    time.sleep(1.0)  # past the 0.3 s timeout
    lengths(handler, body)


def error_500(handler, body):
    send(handler, 500, b'{"error": "overloaded"}')


def error_400(handler, body):
    send(handler, 400, b'{"error": "bad request"}')


def garbage(handler, body):
    send(handler, 200, b"<html>not json")


def one_short(handler, body):
    send(handler, 200, json.dumps({"rewards": [1.0] * (len(body["responses"]) - 1)}).encode())


@contextlib.contextmanager
def reward_server(*script):
    """A ThreadingHTTPServer on 127.0.0.1 (port 0): request i gets script[i], the last entry repeating.
    Yields (url, seen), seen being the JSON bodies of the requests received."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            with contextlib.suppress(OSError):  # the client may have given up (the timeout case)
                script[min(len(seen), len(script)) - 1](self, seen[-1])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/score", seen
    finally:
        server.shutdown()
        server.server_close()


def remote(url: str, max_retries: int = 2) -> RewardWorker:
    return worker(RewardConfig(url=url, timeout_s=0.3, max_retries=max_retries, backoff_s=0.01))


def test_http_reply_is_the_reward():
    with reward_server(lengths) as (url, seen):
        got = remote(url).score_texts(PROMPTS, RESPONSES)
    assert seen == [{"prompts": PROMPTS, "responses": RESPONSES}]
    assert got.scores.tolist() == [float(len(r)) for r in RESPONSES]


@pytest.mark.parametrize(
    "behaviour, says, bound_s",
    [
        (too_slow, "timed out", 3.0),
        (error_500, "HTTP 500", 1.0),
        (garbage, "bad reply", 1.0),
        (one_short, "returned 5 rewards for 6", 1.0),
    ],
    ids=["timeout", "500", "garbage", "wrong-count"],
)
def test_http_failures_are_retried_then_one_clear_error(behaviour, says, bound_s):
    with reward_server(behaviour) as (url, seen):
        w = remote(url, max_retries=2)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError) as info:
            w.score_texts(PROMPTS, RESPONSES)
        elapsed = time.monotonic() - start
    assert len(seen) == 3  # max_retries + 1 attempts
    assert info.value.attempts == 3 and info.value.url == url
    assert url in str(info.value) and "3 attempt" in str(info.value) and says in str(info.value)
    assert elapsed < bound_s


def test_http_client_error_is_not_retried():
    with reward_server(error_400) as (url, seen):
        with pytest.raises(RemoteRewardError, match="HTTP 400") as info:
            remote(url, max_retries=3).score_texts(PROMPTS, RESPONSES)
    assert len(seen) == 1 and info.value.attempts == 1


def test_http_failure_then_success_is_a_success():
    with reward_server(error_500, lengths) as (url, seen):
        got = remote(url, max_retries=1).score_texts(PROMPTS, RESPONSES)
    assert len(seen) == 2 and got.scores.tolist() == [float(len(r)) for r in RESPONSES]


def error_503(handler, body):
    send(handler, 503, b"")


def error_429(handler, body):
    send(handler, 429, b"")


def no_rewards_key(handler, body):
    send(handler, 200, json.dumps({"scores": [1.0] * len(body["responses"])}).encode())


def trickle(handler, body):
    """Headers at once, then one byte every 0.1 s: each read is within the 0.3 s timeout, the reply is not."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    for _ in range(40):
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(0.1)


@pytest.mark.parametrize(
    "behaviour, says",
    [
        (error_503, "HTTP 503"),
        (error_429, "HTTP 429"),
        (no_rewards_key, "bad reply (KeyError: 'rewards')"),
        (lambda h, b: send(h, 200, b'{"rewards": [1.0, "x", 1.0, 1.0, 1.0, 1.0]}'), "returned 'x' at index 1"),
        (trickle, "reply not complete after 0.3 s"),
    ],
    ids=["503", "429", "no-rewards-key", "not-a-number", "trickle"],
)
def test_more_http_failures_are_retried_then_one_clear_error(behaviour, says):
    with reward_server(behaviour) as (url, seen):
        w = remote(url, max_retries=1)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError) as info:
            w.score_texts(PROMPTS, RESPONSES)
        elapsed = time.monotonic() - start
    assert len(seen) == 2 and info.value.attempts == 2 and says in str(info.value)
    assert elapsed < 3.0  # nothing hangs: two attempts of at most ~timeout_s each, plus the backoff


def test_nothing_listening_is_retried_then_fails():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(RemoteRewardError, match="Connection refused") as info:
        remote(url, max_retries=2).score_texts(PROMPTS, RESPONSES)
    assert info.value.attempts == 3 and info.value.url == url


def test_retries_back_off_exponentially():
    arrivals = []

    def late_500(handler, body):
        arrivals.append(time.monotonic())
        error_500(handler, body)

    with reward_server(late_500) as (url, _):
        w = worker(RewardConfig(url=url, timeout_s=1.0, max_retries=3, backoff_s=0.1))
        with pytest.raises(RemoteRewardError):
            w.score_texts(PROMPTS, RESPONSES)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(gaps) == 3
    for gap, wait in zip(gaps, (0.1, 0.2, 0.4), strict=True):  # backoff_s, 2 backoff_s, 4 backoff_s
        assert wait <= gap < wait + 0.5, gaps


def test_remote_reward_error_survives_pickling_as_ray_sends_it():
    err = RemoteRewardError("http://127.0.0.1:1/score", 3, "HTTP 500 Internal Server Error")
    back = pickle.loads(pickle.dumps(err))
    assert (back.url, back.attempts, back.reason, str(back)) == (err.url, err.attempts, err.reason, str(err))
