"""Ctrl-C during an offline stage's Ray Train fit (pipeline.stages.offline.stoppable): the run's handler hears it,
the training controller is aborted once, and the trainer says it was interrupted (fit then raises Interrupted)."""

import signal

import pytest

from pipeline.stages import offline


class Controller:
    def __init__(self):
        self.aborts = 0
        self.abort = self  # controller.abort.remote()

    def remote(self):
        self.aborts += 1
        return "ref"


class RayTrainTrainer:
    def _register_sigint_handler(self, controller):
        raise AssertionError("Ray Train's own handler only aborts: fit would return as if training had finished")


@pytest.fixture
def sigint():
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_reaches_the_run_and_aborts_the_training_once(sigint, monkeypatch):
    monkeypatch.setattr(offline.ray, "get", lambda ref: ref)
    heard = []
    signal.signal(signal.SIGINT, lambda signum, frame: heard.append(signum))  # the run's StopRequest
    trainer, controller = offline.stoppable(RayTrainTrainer)(), Controller()
    assert not trainer.interrupted
    trainer._register_sigint_handler(controller)
    handler = signal.getsignal(signal.SIGINT)
    handler(signal.SIGINT, None)
    assert heard == [signal.SIGINT] and controller.aborts == 1 and trainer.interrupted
    handler(signal.SIGINT, None)  # a second Ctrl-C is the run's to act on (StopRequest: stop at once)
    assert heard == [signal.SIGINT] * 2 and controller.aborts == 1
