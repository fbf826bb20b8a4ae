"""Who holds which KV block: a free list, reference counts, and prefix caching (nano-vllm's BlockManager).

Every request has a `BlockTable`: logical block i (positions i*bs .. i*bs + bs - 1) lives in physical
block blocks[i] of the paged cache (komt.generate.paged_cache; entry 0, the null block, means not held).
Blocks are handed out from a free list on demand, so memory follows the tokens actually generated.

Prefix caching. Once a block is full, it gets a key: a hash of its tokens and of its predecessor's key
(so a key names the whole prefix up to the block's end; salted by the request's `cache_salt`). Keyed
blocks are kept in `cached`; when their last holder lets go they go to the back of the free list with
their contents intact, and a later request whose prompt starts with the same tokens takes them back
instead of recomputing them (multi-turn chat resends the history; many requests share a system
prompt). A block is reused only if its stored tokens and predecessor key equal the new request's
(the check against hash collisions). Fresh blocks come from the front of the free list: blocks that
were never keyed first, then keyed ones, oldest first (least recently used), and their key is dropped.

Sliding window (Mistral). A query at position q sees keys q - W < j <= q, so once a request's next
query position is q0, its blocks wholly at or before q0 - W are never read again: `release_before`
hands them back (their refcount falls; a block shared with another request stays until every holder's
window has passed it). For prefix reuse the same rule runs backwards: a request reusing the first k
blocks starts computing at q0 = k * bs, so it needs only the cached blocks reaching past q0 - W; the
earlier ones may long have been evicted. The keys still chain through them (a key is computed from the
new request's own tokens, not read from the block), so a hit on block k - 1 means the whole prefix
matches. vLLM refused prefix caching with sliding windows because its blocks were overwritten in place
as the window rolled; here a block is never rewritten while keyed, only freed, so the window and the
prefix cache compose: reuse is the longest k whose blocks inside the new request's window are cached.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from komt.errors import GenerationError
from komt.generate.paged_cache import NULL_BLOCK


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix key of a full block: blake2b-128 of the predecessor's key (or the salt) and the tokens."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def salt_key(salt: str | None) -> bytes:
    """What block 0's key chains from: requests with different salts never share blocks."""
    return b"" if not salt else hashlib.blake2b(salt.encode("utf-8"), digest_size=16).digest()


@dataclass
class Block:
    id: int
    refs: int = 0
    key: bytes | None = None  # set while the block is in `cached`
    parent: bytes = b""  # the predecessor's key the key was computed from
    tokens: tuple[int, ...] = ()  # the tokens the key was computed from


@dataclass
class BlockTable:
    """One request's blocks: `blocks[i]` holds logical block i (0: not held); `keys[i]` its prefix key."""

    salt: bytes = b""
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks a new request can take: its first `tokens` positions are computed already."""

    tokens: int
    blocks: list[int]  # per logical block: the cached block, or 0 when outside the request's window
    keys: list[bytes]


class BlockManager:
    """The free list, reference counts and prefix cache of `n_blocks` blocks of `block_size` slots."""

    def __init__(self, n_blocks: int, block_size: int, window: int | None = None, prefix_caching: bool = True) -> None:
        if n_blocks < 2 or block_size < 1:
            raise GenerationError(f"a block manager needs >= 2 blocks (one is the null block) and block_size >= 1, "
                                  f"got {n_blocks} and {block_size}")
        self.block_size, self.window, self.prefix_caching = block_size, window, prefix_caching
        self.blocks = [Block(i) for i in range(n_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, n_blocks))  # front: taken first
        self.cached: dict[bytes, int] = {}

    @property
    def n_free(self) -> int:
        return len(self.free)

    @property
    def n_used(self) -> int:
        return len(self.blocks) - 1 - len(self.free)

    @property
    def capacity(self) -> int:
        """Blocks a request can hold at most (all but the null block)."""
        return len(self.blocks) - 1

    # ---- prefix lookup -------------------------------------------------------------------------------

    def lookup(self, tokens: Sequence[int], salt: bytes = b"") -> PrefixHit:
        """The longest reusable prefix of `tokens` (module docstring). No side effects.

        At least the last token is left to compute: its logits give the first sampled token.
        """
        bs = self.block_size
        n_full = (len(tokens) - 1) // bs
        if not self.prefix_caching or n_full == 0:
            return PrefixHit(0, [], [])
        keys, found, parent = [], [], salt
        for i in range(n_full):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            key = block_key(parent, chunk)
            block = self.cached.get(key)
            if block is not None and (self.blocks[block].tokens != chunk or self.blocks[block].parent != parent):
                block = None  # a hash collision: same key, other tokens
            keys.append(key)
            found.append(block)
            parent = key
        run = 0  # cached blocks in a row ending at block k - 1
        best = 0
        for k in range(1, n_full + 1):
            run = run + 1 if found[k - 1] is not None else 0
            if run >= k - self._first_needed(k * bs):
                best = k
            elif self.window is None:
                break
        first = self._first_needed(best * bs)
        blocks = [NULL_BLOCK] * first + [found[i] for i in range(first, best)]
        return PrefixHit(best * bs, blocks, keys[:best])

    def _first_needed(self, position: int) -> int:
        """The first logical block a query at `position` (or later) can still see."""
        if self.window is None:
            return 0
        return max(0, position - self.window + 1) // self.block_size

    # ---- holding blocks ------------------------------------------------------------------------------

    def fresh_needed(self, table: BlockTable, length: int) -> int:
        """New blocks `table` needs to hold positions < `length`."""
        return max(0, -(-length // self.block_size) - len(table.blocks))

    def room(self, table: BlockTable, start: int) -> int:
        """How many positions from `start` on `table` can hold with its blocks and every free one."""
        return (len(table.blocks) + len(self.free)) * self.block_size - start

    def admit_room(self, hit: PrefixHit) -> int:
        """How many positions after the hit a new request could hold, taking the hit's blocks and every free one."""
        return (len(hit.blocks) + len(self.free) - self._revived(hit)) * self.block_size - hit.tokens

    def _revived(self, hit: PrefixHit) -> int:
        """The hit's blocks that no request holds now: taking them takes them off the free list."""
        return sum(1 for b in hit.blocks if b != NULL_BLOCK and self.blocks[b].refs == 0)

    def admit(self, table: BlockTable, hit: PrefixHit, length: int) -> bool:
        """Give a new request the hit's cached blocks and fresh ones up to `length` positions; all or nothing."""
        revived = self._revived(hit)
        fresh = max(0, -(-length // self.block_size) - len(hit.blocks))
        if revived + fresh > len(self.free):
            return False
        for b in hit.blocks:
            if b != NULL_BLOCK:
                self._hold(b)
        table.blocks, table.keys = list(hit.blocks), list(hit.keys)
        return self.allocate(table, length)

    def allocate(self, table: BlockTable, length: int) -> bool:
        """Extend `table` with fresh blocks to hold positions < `length`; False (and no change) if too few are free."""
        need = self.fresh_needed(table, length)
        if need > len(self.free):
            return False
        for _ in range(need):
            table.blocks.append(self._take_fresh())
        return True

    def commit(self, table: BlockTable, tokens: Sequence[int], computed: int) -> None:
        """Key the blocks that `computed` positions have filled, so later requests can reuse them."""
        bs = self.block_size
        for i in range(len(table.keys), computed // bs):
            parent = table.keys[-1] if table.keys else table.salt
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            key = block_key(parent, chunk)
            table.keys.append(key)
            b = table.blocks[i]
            if self.prefix_caching and b != NULL_BLOCK and key not in self.cached and self.blocks[b].key is None:
                block = self.blocks[b]
                block.key, block.parent, block.tokens = key, parent, chunk
                self.cached[key] = b

    def release_before(self, table: BlockTable, position: int) -> None:
        """Sliding window: let go of the blocks a query at `position` or later can no longer see."""
        for i in range(min(self._first_needed(position), len(table.blocks))):
            if table.blocks[i] != NULL_BLOCK:
                self._release(table.blocks[i])
                table.blocks[i] = NULL_BLOCK

    def free_table(self, table: BlockTable) -> None:
        """Let go of every block of a finished or preempted request (the last block first, so a shared
        prefix stays cached longest)."""
        for b in reversed(table.blocks):
            if b != NULL_BLOCK:
                self._release(b)
        table.blocks, table.keys = [], []

    def _hold(self, b: int) -> None:
        block = self.blocks[b]
        if block.refs == 0:
            del self.free[b]
        block.refs += 1

    def _release(self, b: int) -> None:
        block = self.blocks[b]
        block.refs -= 1
        if block.refs == 0:
            self.free[b] = None
            if block.key is None:
                self.free.move_to_end(b, last=False)  # nothing worth keeping: hand it out first

    def _take_fresh(self) -> int:
        b, _ = self.free.popitem(last=False)
        block = self.blocks[b]
        if block.key is not None:  # evict: its contents are about to be overwritten
            del self.cached[block.key]
            block.key, block.parent, block.tokens = None, b"", ()
        block.refs = 1
        return b
