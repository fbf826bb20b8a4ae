"""The scheduler's decisions (komt.serve.scheduler), step by step with a fake forward: decode first, prefill in
chunks under the token budget, admission, prefix hits, choices sharing a prompt, preemption and recompute."""

from komt.generate.decoding import DecodingState
from komt.serve.blocks import BlockManager
from komt.serve.scheduler import Request, Scheduler

BS = 4


def request(prompt_len, max_new=6, first=100, **kwargs):
    state = DecodingState(list(range(first, first + prompt_len)), max_new_tokens=max_new, vocab_size=1000, device="cpu")
    return Request(state, **kwargs)


def fake_token(req):
    """What the fake model samples: a function of the tokens so far, so a recomputed request samples the same."""
    return sum(req.tokens) % 97


def run_step(sched):
    """Schedule a step, 'run' it, advance, and feed each completed request its next token."""
    step = sched.schedule()
    assert step.tokens <= sched.max_num_batched_tokens and len(sched.running) <= sched.max_num_seqs
    sched.advance(step)
    for s in step.scheduled:
        if s.samples:
            s.request.state.accept(fake_token(s.request))
            if s.request.state.finished:
                sched.finish(s.request)
    return step


def counts(step):
    return {id(s.request): s.count for s in step.scheduled}


def test_decodes_go_first_and_a_long_prompt_is_prefilled_in_chunks_beside_them():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=8)
    a, b = request(3, max_new=20), request(3, max_new=20, first=200)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prompts in one step (6 tokens)
    assert a.state.output_ids and b.state.output_ids
    long = request(30, first=300)
    sched.add(long)
    chunks = []
    while long.prefilling or not long.state.output_ids:
        step = run_step(sched)
        c = counts(step)
        assert c[id(a)] == 1 and c[id(b)] == 1  # every step: the running streams decode
        chunks.append(c[id(long)])
    assert chunks == [6, 6, 6, 6, 6]  # the rest of the budget, a chunk a step, until the prompt is in
    assert long.state.output_ids  # sampled at the step its last chunk went in


def test_admission_stops_at_max_num_seqs_and_the_budget():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=2, max_num_batched_tokens=10)
    reqs = [request(4, first=100 * i) for i in range(1, 5)]
    for r in reqs:
        sched.add(r)
    step = sched.schedule()
    assert [s.request for s in step.scheduled] == reqs[:2] and len(sched.waiting) == 2
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=10)
    for r in (request(8), request(8, first=200)):
        sched.add(r)
    step = sched.schedule()
    assert [s.count for s in step.scheduled] == [8, 2]  # the second prompt starts with what the budget leaves


def test_a_second_request_with_the_same_prompt_starts_after_its_cached_blocks():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=64)
    first = request(14, max_new=2)
    sched.add(first)
    while not first.state.finished:
        run_step(sched)
    again = request(14, max_new=2)
    sched.add(again)
    step = sched.schedule()
    assert again.cached_tokens == 12 and step.scheduled[0].start == 12 and step.scheduled[0].count == 2


def test_choices_of_one_prompt_wait_for_the_first_to_prefill_then_share_its_blocks():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=8)
    leader = request(18)
    sibling = request(18, leader=leader)
    sched.add(leader)
    sched.add(sibling)
    while leader.prefilling:
        run_step(sched)
        assert sibling in sched.waiting or not leader.prefilling
    step = run_step(sched)
    assert sibling.cached_tokens == 16 and counts(step)[id(sibling)] == 2
    assert sibling.table.blocks[:4] == leader.table.blocks[:4]  # the same physical blocks


def _unconstrained(prompts, max_new):
    sched = Scheduler(BlockManager(256, BS), max_num_seqs=8, max_num_batched_tokens=64)
    reqs = [request(n, max_new=max_new, first=100 * (i + 1)) for i, n in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    while len(sched):
        run_step(sched)
    return [r.state.output_ids for r in reqs]


def test_when_blocks_run_out_the_newest_is_preempted_and_recomputed_without_loss():
    prompts, max_new = [5, 6, 7], 10
    blocks = BlockManager(9, BS)  # 8 usable blocks: room for two of these requests at a time, not three
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    reqs = [request(n, max_new=max_new, first=100 * (i + 1)) for i, n in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    preempted = []
    while len(sched):
        step = run_step(sched)
        for victim in step.preempted:
            assert sched.waiting[0] is step.preempted[-1]  # first in line to come back
            assert not any(s.request is victim for s in step.scheduled)
            assert not step.admitted  # no admission in a step that preempted
            preempted.append(victim)
        assert blocks.n_used <= 8
    assert preempted and reqs[0] not in preempted  # the oldest request is never the victim
    assert [r.state.output_ids for r in reqs] == _unconstrained(prompts, max_new)  # nothing lost


def test_the_victim_is_the_newest_running_request():
    blocks = BlockManager(6, BS)  # 5 usable
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = request(7, max_new=20), request(7, max_new=20, first=300)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # 2 blocks each, 1 free
    run_step(sched)  # position 7 and 7: still in block 1
    step = run_step(sched)  # both need a third block at position 8; one is free: old takes it, new is preempted
    assert step.preempted == [new] and [s.request for s in step.scheduled] == [old]
    assert sched.waiting[0] is new and new.num_computed == 0 and new.state.output_ids  # its output is kept
