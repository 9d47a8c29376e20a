"""Prevotes and precommits of one height: tallies by stake, lazily verified.

A vote is stored unverified and counted at once; its signature is checked
only when it is about to matter (a quorum is crossed, or it conflicts with
another vote), and then all pending votes on the same message together, with
one batch check (:meth:`~ledger.consensus.verifier.SignatureVerifier.verify_same_message`).
A vote whose check fails is dropped from the tallies and its sender noted in
``forgers``, for the engine to report.
"""

from __future__ import annotations

from collections.abc import Iterable

from ledger.committee import has_quorum, vote_signing_bytes
from ledger.consensus.verifier import SignatureVerifier
from ledger.state import Committee
from ledger.votes import NIL_BLOCK, CommitCertificate, SignedVote, VoteStep, bitfield_from_indices

__all__ = ["HeightVotes", "VoteEntry"]

_PRECOMMIT = VoteStep.PRECOMMIT


class VoteEntry:
    __slots__ = ("signed", "msg", "stake", "verified", "peer")

    def __init__(self, signed: SignedVote, msg: bytes, stake: int, verified: bool, peer: str | None) -> None:
        self.signed = signed
        self.msg = msg
        self.stake = stake
        self.verified = verified
        self.peer = peer  # who sent it: charged if the signature turns out bad


class _RoundStepVotes:
    """Votes of one (round, step): each validator counted once, by its first not-disproved vote."""

    __slots__ = ("by_validator", "tally", "total")

    def __init__(self) -> None:
        self.by_validator: dict[bytes, list[VoteEntry]] = {}
        self.tally: dict[bytes, int] = {}
        self.total = 0

    def counted(self) -> Iterable[VoteEntry]:
        for entries in self.by_validator.values():
            yield entries[0]


class HeightVotes:
    """Prevotes and precommits for one height, over that height's committee."""

    MAX_ENTRIES_PER_SLOT = 2  # enough to prove an equivocation

    def __init__(
        self,
        chain_id: bytes,
        height: int,
        committee: Committee,
        verifier: SignatureVerifier,
        forgers: list[str | None] | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.height = height
        self.committee = committee
        self.total_stake = committee.total_stake
        self.members = {m.address: (i, m) for i, m in enumerate(committee.members)}
        self.verifier = verifier
        self.slots: dict[tuple[int, int], _RoundStepVotes] = {}
        self._precommit_slots: list[tuple[int, _RoundStepVotes]] = []  # checked after every message
        # signing bytes per distinct vote: a height has a handful of distinct votes and hundreds of signers
        self._signing: dict[tuple[int, int, int, bytes], bytes] = {}
        self.round_stake: dict[int, dict[bytes, int]] = {}  # round -> validator -> stake (any message)
        self.drops = 0  # entries dropped after a failed check (see ConsensusEngine._advance)
        # senders of the dropped entries, for the engine to report (a list it owns: it outlives this height)
        self.forgers: list[str | None] = forgers if forgers is not None else []

    def slot(self, round_: int, step: int) -> _RoundStepVotes:
        s = self.slots.get((round_, step))
        if s is None:
            s = self.slots[(round_, step)] = _RoundStepVotes()
            if step == _PRECOMMIT:
                self._precommit_slots.append((round_, s))
        return s

    def add(self, sv: SignedVote, *, verified: bool = False, peer: str | None = None) -> tuple[str, VoteEntry | None]:
        """Store a vote. Returns (outcome, other): outcome in new/duplicate/invalid/conflict/full."""
        member = self.members.get(sv.validator)
        if member is None:
            return "not_member", None
        stake = member[1].stake
        vote = sv.vote
        slot = self.slot(vote.round, vote.step)
        entries = slot.by_validator.get(sv.validator)
        key = (vote.height, vote.round, vote.step, vote.block_hash)
        msg = self._signing.get(key)
        if msg is None:
            msg = self._signing[key] = vote_signing_bytes(self.chain_id, vote)
        entry = VoteEntry(sv, msg, stake, verified, peer)
        if not entries:
            slot.by_validator[sv.validator] = [entry]
            slot.tally[vote.block_hash] = slot.tally.get(vote.block_hash, 0) + stake
            slot.total += stake
            participants = self.round_stake.get(vote.round)
            if participants is None:
                participants = self.round_stake[vote.round] = {}
            participants[sv.validator] = stake
            return "new", None
        for e in entries:
            if e.signed.vote.block_hash == vote.block_hash:
                if e.signed.signature == sv.signature:
                    return "duplicate", None
                # BLS is deterministic: a different signature on the same vote is a forgery (or ours is)
                if not self.verifier.verify(member[1].bls_pubkey, msg, sv.signature):
                    return "invalid", None
                if not e.verified and not self._check(e):
                    self._drop(slot, sv.validator, e)
                    return self.add(sv, verified=True, peer=peer)
                return "duplicate", None
        # a different block from the same validator in the same (round, step): check both now
        if not verified and not self.verifier.verify(member[1].bls_pubkey, msg, sv.signature):
            return "invalid", None
        entry.verified = True
        first = entries[0]
        if not first.verified and not self._check(first):
            self._drop(slot, sv.validator, first)
            return self.add(sv, verified=True, peer=peer)
        if len(entries) >= self.MAX_ENTRIES_PER_SLOT:
            return "full", None
        entries.append(entry)
        return "conflict", first

    def _check(self, e: VoteEntry) -> bool:
        pk = self.members[e.signed.validator][1].bls_pubkey
        e.verified = self.verifier.verify(pk, e.msg, e.signed.signature)
        return e.verified

    def _drop(self, slot: _RoundStepVotes, validator: bytes, e: VoteEntry) -> None:
        """Forget an entry whose signature failed its check."""
        self.drops += 1
        self.forgers.append(e.peer)
        entries = slot.by_validator[validator]
        was_counted = entries[0] is e
        entries.remove(e)
        if was_counted:
            h = e.signed.vote.block_hash
            slot.tally[h] -= e.stake
            slot.total -= e.stake
            if entries:
                nxt = entries[0].signed.vote.block_hash
                slot.tally[nxt] = slot.tally.get(nxt, 0) + e.stake
                slot.total += e.stake
            else:
                del slot.by_validator[validator]
                r = e.signed.vote.round
                if not any(
                    validator in self.slots[(r, s)].by_validator for s in (1, 2) if (r, s) in self.slots
                ):
                    self.round_stake.get(r, {}).pop(validator, None)

    def _verify_pending(self, slot: _RoundStepVotes, block_hash: bytes | None) -> None:
        """Verify every counted, unverified entry (for ``block_hash``, or all), aggregate first."""
        groups: dict[bytes, list[tuple[bytes, VoteEntry]]] = {}
        for validator, entries in slot.by_validator.items():
            e = entries[0]
            if e.verified or (block_hash is not None and e.signed.vote.block_hash != block_hash):
                continue
            groups.setdefault(e.msg, []).append((validator, e))
        for msg, items in groups.items():
            pks = [(self.members[v][1].bls_pubkey, e.signed.signature) for v, e in items]
            verdicts = self.verifier.verify_same_message(msg, pks)
            for (validator, e), ok in zip(items, verdicts):
                if ok:
                    e.verified = True
                else:
                    self._drop(slot, validator, e)

    def quorum_for(self, round_: int, step: int, block_hash: bytes) -> bool:
        slot = self.slots.get((round_, step))
        if slot is None or not has_quorum(slot.tally.get(block_hash, 0), self.total_stake):
            return False
        self._verify_pending(slot, block_hash)
        return has_quorum(slot.tally.get(block_hash, 0), self.total_stake)

    def quorum_any(self, round_: int, step: int) -> bool:
        slot = self.slots.get((round_, step))
        if slot is None or not has_quorum(slot.total, self.total_stake):
            return False
        self._verify_pending(slot, None)
        return has_quorum(slot.total, self.total_stake)

    def round_participation(self, round_: int) -> int:
        return sum(self.round_stake.get(round_, {}).values())

    def verify_round(self, round_: int) -> None:
        for step in (VoteStep.PREVOTE, VoteStep.PRECOMMIT):
            slot = self.slots.get((round_, step))
            if slot is not None:
                self._verify_pending(slot, None)

    def blocks_with_precommits(self) -> list[tuple[int, bytes]]:
        """(round, block) pairs whose precommit tally (pending included) crosses 2/3."""
        out = []
        total_stake = self.total_stake
        for r, slot in self._precommit_slots:
            # a block's tally is part of the slot's total: below quorum, no block in it can have one
            if not has_quorum(slot.total, total_stake):
                continue
            for h, stake in slot.tally.items():
                if h != NIL_BLOCK and has_quorum(stake, self.total_stake):
                    out.append((r, h))
        if len(out) > 1:
            out.sort()
        return out

    def certificate(self, round_: int, block_hash: bytes) -> CommitCertificate:
        """Aggregate the verified precommits for (round, block) into a commit certificate."""
        slot = self.slots[(round_, VoteStep.PRECOMMIT)]
        indices, sigs = [], []
        for validator, entries in slot.by_validator.items():
            e = entries[0]
            if e.verified and e.signed.vote.block_hash == block_hash:
                indices.append(self.members[validator][0])
                sigs.append((self.members[validator][0], e.signed.signature))
        sigs.sort()
        return CommitCertificate(
            height=self.height,
            round=round_,
            block_hash=block_hash,
            signers=bitfield_from_indices(indices, len(self.committee.members)),
            aggregate_signature=self.verifier.aggregate([s for _, s in sigs]),
        )

    def own_votes(self, address: bytes, round_: int) -> list[SignedVote]:
        out = []
        for step in (VoteStep.PREVOTE, VoteStep.PRECOMMIT):
            slot = self.slots.get((round_, step))
            if slot is not None and address in slot.by_validator:
                out.append(slot.by_validator[address][0].signed)
        return out
