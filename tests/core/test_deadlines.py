"""Queue deadlines: a request may bound how long it waits to start (issue 13; S2.4, S4.1)."""

from loramux.core.request import RequestStatus
from tests.utils import FakeClock, fake_for, make_request, make_scheduler, step


def test_S2_4_a_request_past_its_queue_deadline_ends_as_timeout_and_frees_nothing_it_never_had():
    clock = FakeClock()
    s = make_scheduler(num_pages=64, max_num_seqs=1, clock=clock)
    ex = fake_for(s)
    busy = make_request(8, max_tokens=20)
    s.add_request(busy)
    late = make_request(8, max_tokens=4, rid="late", queue_deadline=2.0)
    patient = make_request(8, max_tokens=4, rid="patient", queue_deadline=100.0)
    s.add_request(late)
    s.add_request(patient)
    out = step(s, ex)
    assert [q.request_id for q in out.seqs] == [busy.request_id]  # one seat: the others wait
    clock.advance(1.0)
    step(s, ex)
    assert late.status is RequestStatus.WAITING  # 1 s < 2 s
    clock.advance(1.5)
    out = step(s, ex)
    assert late.status is RequestStatus.FINISHED_TIMEOUT and late.status.finish_reason == "timeout"
    assert "late" in out.finished_ids and "late" not in s.requests
    assert not late.page_ids and late.first_scheduled_time is None
    assert patient.status is RequestStatus.WAITING and len(s.policy) == 1
    while s.has_unfinished():
        clock.advance(0.1)
        step(s, ex)
    assert patient.status is RequestStatus.FINISHED_LENGTH  # started before its deadline: it ran
    s.check_integrity()


def test_S2_4_a_deadline_binds_only_the_wait_to_start_not_the_run():
    clock = FakeClock()
    s = make_scheduler(num_pages=64, clock=clock)
    ex = fake_for(s)
    r = make_request(8, max_tokens=30, queue_deadline=0.5)
    s.add_request(r)
    while s.has_unfinished():
        clock.advance(0.2)  # 30 tokens take 6 s, far past the deadline: it started in time
        step(s, ex)
    assert r.status is RequestStatus.FINISHED_LENGTH
