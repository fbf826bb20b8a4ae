"""The block manager (komt.serve.blocks): free list, reference counts, prefix keys, collisions, the window."""

import pytest

from komt.serve.blocks import BlockManager, BlockTable, block_key, salt_key

BS = 4


def _filled(manager, tokens, salt=b""):
    """A table holding `tokens`, computed and keyed, as a request that prefilled them leaves it."""
    table = BlockTable(salt=salt)
    assert manager.admit(table, manager.lookup(tokens, salt), len(tokens))
    manager.commit(table, tokens, len(tokens))
    return table


def test_lookup_takes_the_longest_cached_prefix_and_leaves_the_last_token():
    m = BlockManager(16, BS)
    tokens = list(range(100, 113))  # 13 tokens: 3 full blocks
    first = _filled(m, tokens)
    assert m.lookup(tokens, b"").tokens == 12
    assert m.lookup(tokens[:12], b"").tokens == 8  # the whole prompt is cached: its last token is recomputed
    assert m.lookup(tokens[:9] + [1, 2, 3, 4], b"").tokens == 8  # diverges inside block 2
    assert m.lookup([7] + tokens[1:], b"").tokens == 0  # diverges in block 0: every key after it differs
    assert m.lookup(tokens, salt_key("other")).tokens == 0  # another salt never shares
    hit = m.lookup(tokens, b"")
    assert hit.blocks == first.blocks[:3] and hit.keys == first.keys[:3]


def test_shared_blocks_are_reference_counted_and_stay_cached_when_freed():
    m = BlockManager(8, BS)  # 7 usable blocks
    tokens = list(range(9))
    a = _filled(m, tokens)
    b = BlockTable()
    assert m.admit(b, m.lookup(tokens, b""), len(tokens))
    assert b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]  # 2 shared, the partial one is not
    assert m.n_used == 4
    m.free_table(a)
    assert m.n_used == 3  # the shared blocks are still b's
    m.free_table(b)
    assert m.n_used == 0 and m.n_free == 7
    assert m.lookup(tokens, b"").tokens == 8  # freed, but their contents are kept for the next request


def test_fresh_blocks_evict_unkeyed_first_then_a_prefix_from_its_end():
    m = BlockManager(5, BS)  # 4 usable blocks
    old_tokens = list(range(10, 19))  # 9 tokens: 2 keyed blocks and a partial one
    m.free_table(_filled(m, old_tokens))
    assert m.lookup(old_tokens, b"").tokens == 8
    _filled(m, list(range(20, 29)))  # 3 fresh blocks: the partial one, the never-used one, old block 1
    assert m.lookup(old_tokens, b"").tokens == 4  # the prefix's first block outlives its second
    assert m.allocate(BlockTable(), BS)  # the last free block: old block 0
    assert m.lookup(old_tokens, b"").tokens == 0


def test_a_hash_collision_is_caught_by_comparing_tokens():
    m = BlockManager(8, BS)
    tokens = [1, 2, 3, 4, 5]
    table = _filled(m, tokens)
    m.blocks[table.blocks[0]].tokens = (9, 9, 9, 9)  # as if other tokens had hashed to the same key
    assert m.lookup(tokens, b"").tokens == 0


def test_keys_chain_through_the_predecessor():
    parent = block_key(b"", [1, 2, 3, 4])
    assert block_key(parent, [5, 6, 7, 8]) != block_key(block_key(b"", [0, 2, 3, 4]), [5, 6, 7, 8])


def test_allocation_is_all_or_nothing():
    m = BlockManager(4, BS)  # 3 usable
    table = BlockTable()
    assert not m.allocate(table, 4 * BS)
    assert table.blocks == [] and m.n_free == 3
    assert m.allocate(table, 3 * BS) and m.n_free == 0
    assert m.room(table, 2 * BS + 1) == BS - 1


@pytest.mark.parametrize("position, released", [(8, 0), (9, 1), (12, 1), (13, 2)])
def test_release_before_frees_blocks_the_window_has_passed(position, released):
    m = BlockManager(8, BS, window=6)
    table = BlockTable()
    assert m.allocate(table, 16)
    m.release_before(table, position)  # a query at `position` sees keys > position - 6
    assert table.blocks[:released] == [0] * released and 0 not in table.blocks[released:]
    assert m.n_used == 4 - released


def _evict(m, key):
    m.blocks[m.cached.pop(key)].key = None


def test_with_a_window_only_the_blocks_inside_it_must_still_be_cached():
    m = BlockManager(16, BS, window=6)
    tokens = list(range(30, 47))  # 17 tokens: 4 full blocks
    m.free_table(_filled(m, tokens))
    hit = m.lookup(tokens, b"")
    # A request starting at position 16 needs keys > 10 only: blocks 2 and 3; blocks 0, 1 are not taken.
    assert hit.tokens == 16 and hit.blocks[:2] == [0, 0] and 0 not in hit.blocks[2:]
    _evict(m, hit.keys[0])  # block 0 gone: the keys still chain through it, so the reuse holds
    assert m.lookup(tokens, b"").tokens == 16
    _evict(m, hit.keys[3])  # block 3 gone: the reuse stops at block 2, starting at 12, which needs blocks 1, 2
    shorter = m.lookup(tokens, b"")
    assert shorter.tokens == 12 and shorter.blocks == [0, m.cached[hit.keys[1]], m.cached[hit.keys[2]]]


def test_without_a_window_every_prefix_block_must_be_cached():
    m = BlockManager(16, BS)
    tokens = list(range(30, 47))
    _evict(m, _filled(m, tokens).keys[0])
    assert m.lookup(tokens, b"").tokens == 0
