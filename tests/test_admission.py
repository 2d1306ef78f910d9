"""Admission by predicted wait (service.api.admission), on a made-up clock: what is predicted from what was
served, what is refused, and the Retry-After it is told."""

from __future__ import annotations

import asyncio

import pytest

from service.api.admission import AdmissionMiddleware, WaitPredictor
from service.metrics import Metrics


def serve(predictor: WaitPredictor, route: str, start: float, end: float) -> None:
    predicted = predictor.started(route, start)
    predictor.finished(route, end, end - start, predicted, served=True)


def test_the_prediction_learns_each_routes_model_time() -> None:
    predictor = WaitPredictor(initial=0.5)
    now = 0.0
    for _ in range(200):  # alone, one after another: /answer takes 1 s, /rerank 0.1 s
        serve(predictor, "/answer", now, now + 1.0)
        serve(predictor, "/rerank", now + 1.0, now + 1.1)
        now += 1.1
    assert predictor.cost["/answer"] == pytest.approx(1.0, rel=0.01)
    assert predictor.cost["/rerank"] == pytest.approx(0.1, rel=0.01)
    # Three answers and ten reranks ahead: 4 s of model work before a new request is served.
    for route, count in (("/answer", 3), ("/rerank", 10)):
        for _ in range(count):
            predictor.started(route, now)
    assert predictor.predicted_wait("/rerank") == pytest.approx(4.0, rel=0.05)
    assert predictor.predicted_wait("/answer") == pytest.approx(4.0, rel=0.05)  # the same for every route
    assert predictor.predicted_seconds("/answer") == pytest.approx(5.0, rel=0.05)


def test_a_lone_client_is_never_kept_waiting_by_its_own_slow_requests() -> None:
    predictor = WaitPredictor(initial=0.5)
    now = 0.0
    for _ in range(5):  # each takes 6 s against a prediction of well under that: the correction rises
        serve(predictor, "/answer", now, now + 6.0)
        now += 6.0
    assert predictor.correction["/answer"] > 2
    assert predictor.predicted_wait("/answer") == 0.0  # nothing ahead of the next one
    predictor.started("/answer", now)
    assert predictor.predicted_wait("/answer") > 6.0  # one ahead: its time, corrected


def test_a_request_released_by_its_route_is_no_longer_work_ahead() -> None:
    # A streamed answer: the model is done before the last bytes are sent, and a client that has read the
    # final event may already be asking again.
    predictor = WaitPredictor(initial=2.0)
    predicted = predictor.started("/answer", 0.0)
    assert predictor.predicted_wait("/answer") == pytest.approx(2.0)
    predictor.release("/answer")
    assert predictor.predicted_wait("/answer") == 0.0 and predictor.in_flight == 0
    predictor.finished("/answer", 2.0, 2.0, predicted, served=True, released=True)
    assert predictor.in_flight == 0 and predictor.cost["/answer"] == pytest.approx(2.0)


def test_a_pass_that_answers_several_requests_at_once_shares_its_time() -> None:
    predictor = WaitPredictor(initial=0.5)
    now = 0.0
    for _ in range(300):  # four requests per 0.4 s pass
        for _ in range(4):
            predictor.started("/rerank", now)
        for _ in range(4):
            predictor.finished("/rerank", now + 0.4, 0.4, 0.4, served=True)
        now += 0.4
    assert predictor.cost["/rerank"] == pytest.approx(0.1, rel=0.15)


def test_requests_that_take_longer_than_predicted_raise_the_prediction_fast() -> None:
    predictor = WaitPredictor(initial=1.0)
    predictor.cost["/rerank"] = 1.0
    before = predictor.predicted_seconds("/rerank")
    # Served later than predicted (others were served ahead of it): the correction goes up at once ...
    predicted = predictor.started("/rerank", 0.0)
    predictor.finished("/rerank", 3.0, 3.0, predicted, served=False)  # a quick error teaches nothing
    assert predictor.predicted_seconds("/rerank") == before
    predicted = predictor.started("/rerank", 0.0)
    predictor.finished("/rerank", 1.0, 3.0, predicted, served=True)
    raised = predictor.correction["/rerank"]
    assert raised > 1.5
    # ... and comes down slowly when requests are faster than predicted.
    predicted = predictor.started("/rerank", 1.0)
    predictor.finished("/rerank", 2.0, 0.5, predicted, served=True)
    assert 1.0 < predictor.correction["/rerank"] < raised


def admission(max_wait_ms: int = 2000, limit: int = 32) -> AdmissionMiddleware:
    async def app(scope: dict, receive: object, send: object) -> None:
        raise AssertionError("not reached")

    return AdmissionMiddleware(app, [], limit, max_wait_ms, shed_delay_ms=0, metrics=Metrics())


def test_refused_when_the_predicted_wait_exceeds_the_deadline_with_an_honest_retry_after() -> None:
    middleware = admission(max_wait_ms=2000)
    predictor = middleware.predictor
    predictor.cost.update({"/answer": 1.0, "/rerank": 0.1})
    assert middleware.refusal("/answer") is None  # nothing ahead: admitted whatever it costs
    predictor.started("/answer", 0.0)
    predictor.started("/answer", 0.0)
    assert middleware.refusal("/rerank") is None  # 2 s ahead: within the deadline
    predictor.started("/answer", 0.0)
    predictor.started("/answer", 0.0)
    predictor.started("/answer", 0.0)
    reason = middleware.refusal("/rerank")
    assert reason is not None and "GRERANK_MAX_WAIT_MS" in reason and "5.0 s" in reason
    assert middleware.retry_after("/rerank") == 3  # 5 s ahead, 2 s allowed: three answers must go first


def test_refused_beyond_the_count_limit_whatever_the_prediction() -> None:
    middleware = admission(max_wait_ms=60_000, limit=3)
    middleware.predictor.cost["/rerank"] = 0.001
    for _ in range(3):
        middleware.predictor.started("/rerank", 0.0)
    reason = middleware.refusal("/rerank")
    assert reason is not None and "GRERANK_MAX_QUEUE" in reason
    assert middleware.retry_after("/rerank") == 1


def test_a_refusal_is_held_then_answered_429_with_retry_after() -> None:
    middleware = AdmissionMiddleware(
        lambda *_: None, [], limit=1, max_wait_ms=100, shed_delay_ms=200, metrics=Metrics()
    )
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def refuse() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await middleware._refuse("/rerank", "rerank", "busy", send)
        return loop.time() - start

    assert asyncio.run(refuse()) >= 0.19
    assert sent[0]["status"] == 429 and (b"retry-after", b"1") in sent[0]["headers"]
    assert b"busy" in sent[1]["body"]
