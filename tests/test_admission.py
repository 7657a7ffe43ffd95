"""Gang admission (pure bookkeeping): whole sessions enter only when the next step can prefill them all."""

from fedattn_vllm.admission import EngineCapacity, GangAdmission, SessionDemand

CAPACITY = EngineCapacity(max_batched_tokens=100, max_seqs=6, kv_blocks=10, block_size=16)


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}:{i}" for i in range(n)]


def test_sessions_share_a_step_until_its_token_budget_is_spent():
    admission = GangAdmission(CAPACITY)
    assert admission.try_admit("a", SessionDemand((30, 30), (1, 2)), ids("a", 2))
    assert not admission.try_admit("b", SessionDemand((20, 25), (1, 2)), ids("b", 2))  # 60 + 45 > 100
    admission.stepped()  # a prefilled: now 2 decoding requests take one token each
    assert admission.try_admit("b", SessionDemand((20, 25), (1, 2)), ids("b", 2))


def test_sequence_slots_and_reserved_blocks_bound_admission_until_requests_finish():
    admission = GangAdmission(CAPACITY)
    assert admission.try_admit("a", SessionDemand((10, 10, 10, 10), (1, 1, 1, 40)), ids("a", 4))  # 1+1+1+4 blocks
    admission.stepped()
    assert not admission.try_admit("b", SessionDemand((5, 5, 5), (1, 1, 1)), ids("b", 3))  # 7 slots > 6
    assert not admission.try_admit("c", SessionDemand((5, 40), (1, 40)), ids("c", 2))  # 7 + 1 + 5 blocks > 10
    for request in ids("a", 3):
        admission.finished(request)
    assert admission.live_requests == 1
    assert admission.try_admit("c", SessionDemand((5, 40), (1, 40)), ids("c", 2))


def test_sessions_that_can_never_fit_say_why():
    admission = GangAdmission(CAPACITY)
    assert "max_num_batched_tokens" in admission.why_never(SessionDemand((60, 60), (1, 1)))
    assert "max_num_seqs" in admission.why_never(SessionDemand((1,) * 7, (1,) * 7))
    assert "K/V blocks" in admission.why_never(SessionDemand((10,), (200,)))
    assert admission.why_never(SessionDemand((50, 50), (1, 30))) is None  # 4 + 5 blocks


def test_a_reserved_session_keeps_its_prompt_in_every_step_budget_until_it_starts_and_a_step_runs():
    admission = GangAdmission(CAPACITY)
    assert admission.try_reserve("a", SessionDemand((60,), (1,)), ids("a", 1))
    admission.stepped()  # a was not started: its 60 tokens still wait for a step
    assert not admission.try_reserve("b", SessionDemand((50,), (1,)), ids("b", 1))
    admission.start("a")
    assert not admission.try_reserve("b", SessionDemand((50,), (1,)), ids("b", 1))
    admission.stepped()  # a prefilled: one decoding token left
    assert admission.try_reserve("b", SessionDemand((50,), (1,)), ids("b", 1))
    admission.cancel("b", ids("b", 1))
    assert admission.live_requests == 1
