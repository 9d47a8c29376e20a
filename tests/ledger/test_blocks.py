"""Blocks, commit certificates, committees, light verification, genesis files, chain recovery."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ledger import exceptions as ex
from ledger.blocks import FinalizedBlock
from ledger.chain import Chain, ChainError
from ledger.committee import (
    compute_committee,
    compute_epoch,
    compute_proposer,
    has_quorum,
    verify_certificate,
    verify_chain,
)
from ledger.devtools import DevChain, certify, make_dev_network
from ledger.genesis import genesis_from_json, genesis_to_json, initial_state, load_genesis, save_genesis
from ledger.params import Params
from ledger.state import Validator, ValidatorStatus
from ledger.transactions import Transfer
from ledger.transition import apply_block, build_block, committee_for_height
from ledger.votes import bitfield_from_indices, indices_from_bitfield

from .test_transition import tx


def produced(chain: DevChain, n: int) -> None:
    for _ in range(n):
        chain.produce()


# ---------------------------------------------------------------- certificates


def test_quorum_is_strictly_more_than_two_thirds():
    assert not has_quorum(2, 3)
    assert has_quorum(3, 4)
    assert not has_quorum(200, 300)
    assert has_quorum(201, 300)


def test_bitfield_round_trip_and_stray_bits():
    field = bitfield_from_indices({0, 3, 9}, 10)
    assert indices_from_bitfield(field, 10) == [0, 3, 9]
    with pytest.raises(ValueError, match="beyond the committee"):
        indices_from_bitfield(bytes([0, 0b100]), 10)
    with pytest.raises(ValueError, match="needs 2"):
        indices_from_bitfield(b"\x01", 10)


def test_certificate_needs_quorum_and_good_signature(chain):
    chain.produce()
    committee = committee_for_height(chain.state, 1)
    keys = chain.network.validator_keys()
    block_hash = chain.blocks[-1].block.block_hash()
    members = [m.address for m in committee.members]
    good = certify(committee, keys, chain.chain_id, 1, 0, block_hash, signers=members[:3])
    verify_certificate(committee, chain.chain_id, good, height=1, block_hash=block_hash)
    weak = certify(committee, keys, chain.chain_id, 1, 0, block_hash, signers=members[:2])
    with pytest.raises(ex.InvalidCertificate, match="need more than 2/3"):
        verify_certificate(committee, chain.chain_id, weak)
    other = certify(committee, keys, chain.chain_id, 1, 0, b"\x09" * 32, signers=members)
    forged = dataclasses.replace(good, aggregate_signature=other.aggregate_signature)
    with pytest.raises(ex.InvalidCertificate, match="does not verify"):
        verify_certificate(committee, chain.chain_id, forged)
    with pytest.raises(ex.InvalidCertificate, match="another block"):
        verify_certificate(committee, chain.chain_id, good, block_hash=b"\x01" * 32)
    with pytest.raises(ex.InvalidCertificate, match="expected 2"):
        verify_certificate(committee, chain.chain_id, good, height=2)
    wrong_chain = certify(committee, keys, b"\x02" * 32, 1, 0, block_hash)
    with pytest.raises(ex.InvalidCertificate, match="does not verify"):
        verify_certificate(committee, chain.chain_id, wrong_chain)


# ---------------------------------------------------------------- apply_block rejections


def _next_block(chain: DevChain, txs=()):
    last = chain.blocks[-1].certificate if chain.blocks else None
    block, _, _ = build_block(chain.state, txs, proposer=chain.next_proposer(), last_commit=last)
    return block


def _reheader(block, **changes):
    return dataclasses.replace(block, header=dataclasses.replace(block.header, **changes))


def test_apply_block_rejections_leave_state_untouched(chain):
    produced(chain, 2)
    before = chain.state.encode()
    good = _next_block(chain, [tx(chain, "c0", Transfer, to=chain.network.address("c1"), amount=3)])
    committee = committee_for_height(chain.state, 3)
    wrong_proposer = next(m.address for m in committee.members if m.address != good.header.proposer)
    weak_cert = certify(
        committee_for_height(chain.state, 2), chain.network.validator_keys(), chain.chain_id, 2, 0,
        chain.state.last_block_hash, signers=[committee.members[0].address],
    )
    bad_tx = tx(chain, "c0", Transfer, to=chain.network.address("c1"), amount=10**12)
    cases = [
        (_reheader(good, height=5), "expected 3"),
        (_reheader(good, prev_hash=b"\x00" * 32), "does not build on the current head"),
        (_reheader(good, proposer=wrong_proposer), "wrong validator"),
        (_reheader(good, last_commit=None), "lacks the certificate"),
        (_reheader(good, last_commit=weak_cert), "need more than 2/3"),
        (_reheader(good, tx_root=b"\x00" * 32), "tx_root"),
        (_reheader(good, state_root=b"\x00" * 32), "state root"),
        (dataclasses.replace(good, transactions=()), "tx_root"),
    ]
    for block, match in cases:
        with pytest.raises(ex.InvalidBlock, match=match):
            apply_block(chain.state, block)
    # a block carrying an invalid transaction, with matching roots, is invalid as a whole
    from ledger.blocks import compute_tx_root

    smuggled = dataclasses.replace(good, transactions=(bad_tx,))
    smuggled = _reheader(smuggled, tx_root=compute_tx_root((bad_tx,)))
    with pytest.raises(ex.InvalidBlock, match="transaction 0 .*InsufficientBalance|transaction 0"):
        apply_block(chain.state, smuggled)
    assert chain.state.encode() == before
    assert apply_block(chain.state, good).height == 3


def test_build_block_skips_invalid_transactions(chain):
    good = tx(chain, "c0", Transfer, to=chain.network.address("c1"), amount=3)
    bad = tx(chain, "c1", Transfer, to=chain.network.address("c0"), amount=10**12)
    block, rejected = chain.produce([bad, good])
    assert [t.tx_hash() for t in block.transactions] == [good.tx_hash()]
    assert len(rejected) == 1 and isinstance(rejected[0][1], ex.InsufficientBalance)


# ---------------------------------------------------------------- committees


def test_committee_sample_is_stake_weighted_and_deterministic():
    vals = {
        bytes([i]) * 20: Validator(bls_pubkey=bytes([i]) * 48, stake=1000 * (i + 1), status=ValidatorStatus.ACTIVE,
                                   jailed_until=0, unbonding=())
        for i in range(20)
    }
    vals[b"\x63" * 20] = Validator(bls_pubkey=b"\x63" * 48, stake=10**9, status=ValidatorStatus.JAILED,
                                   jailed_until=99, unbonding=())
    a = compute_committee(vals, b"seed", 8, 3, 1)
    assert a == compute_committee(vals, b"seed", 8, 3, 1)
    assert len(a.members) == 8
    assert [m.address for m in a.members] == sorted(m.address for m in a.members)
    assert b"\x63" * 20 not in {m.address for m in a.members}  # jailed: never selected
    counts = {}
    for s in range(300):
        for m in compute_committee(vals, s.to_bytes(4, "big"), 4, 0, 1).members:
            counts[m.address] = counts.get(m.address, 0) + 1
    assert counts[bytes([19]) * 20] > counts.get(bytes([0]) * 20, 0) * 3


def test_proposer_rotates_with_round_and_is_a_member(chain):
    committee = chain.state.committee
    proposers = {compute_proposer(committee, 1, r) for r in range(20)}
    assert proposers <= {m.address for m in committee.members}
    assert len(proposers) > 1


def test_committee_rotates_and_light_client_follows(dev_network):
    params = dataclasses.replace(dev_network.genesis.params, epoch_length=4)
    net = make_dev_network(validators=("v0", "v1", "v2", "v3", "v4"), providers=(), clients=("c0",), params=params,
                           stakes={"v4": 1_000_000})
    chain = DevChain(net)
    genesis_committee = chain.state.committee
    for _ in range(10):
        chain.produce()
    assert compute_epoch(10, 4) == 2
    assert chain.state.committee.epoch == 2
    height, head, committee = verify_chain(chain.chain_id, genesis_committee, 4, chain.blocks)
    assert height == 10 and head == chain.state.last_block_hash and committee == chain.state.committee
    # tampering with any link is caught at that height
    bad = list(chain.blocks)
    bad[5] = dataclasses.replace(bad[5], certificate=bad[4].certificate)
    with pytest.raises(ex.InvalidCertificate, match="expected 6"):
        verify_chain(chain.chain_id, genesis_committee, 4, bad)
    skip = chain.blocks[:3] + chain.blocks[4:]
    with pytest.raises(ex.InvalidCertificate, match="expected block 4"):
        verify_chain(chain.chain_id, genesis_committee, 4, skip)


# ---------------------------------------------------------------- genesis


def test_genesis_json_round_trip(dev_network, tmp_path):
    path = tmp_path / "genesis.json"
    save_genesis(path, dev_network.genesis)
    loaded = load_genesis(path)
    assert loaded == dev_network.genesis
    assert loaded.chain_id() == dev_network.genesis.chain_id()


def _genesis_obj(dev_network):
    return json.loads(genesis_to_json(dev_network.genesis))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda g: g.pop("validators"), "validators: missing"),
        (lambda g: g.update(extra=1), "unknown field"),
        (lambda g: g["validators"][1].update(bls_pubkey="ab"), r"validators\[1\].bls_pubkey: expected exactly 48 bytes"),
        (lambda g: g["validators"][0].update(stake="lots"), r"validators\[0\].stake: expected an integer"),
        (lambda g: g["accounts"][0].update(address="zz" * 20), r"accounts\[0\].address: not valid hex"),
        (lambda g: g["params"].update(epoch_length=-1), r"params.epoch_length: integer -1 out of range"),
        (lambda g: g["params"].update(bogus=1), "params: unknown field"),
        (lambda g: g.update(validators=[]), "validators: expected 1..10000"),
        (lambda g: g["validators"][0].update(stake=1), r"validators\[0\].stake: 1 below"),
        (lambda g: g["validators"][0].update(proof_of_possession=g["validators"][1]["proof_of_possession"]),
         r"validators\[0\].proof_of_possession: does not verify"),
        (lambda g: g["accounts"].append(dict(g["accounts"][0])), "appears twice"),
        (lambda g: g["params"].update(epoch_length=0), "epoch_length and committee_size must be positive"),
        (lambda g: g["params"].update(protocol_fee_bps=20_000), "exceeds 10000"),
    ],
)
def test_bad_genesis_files_name_the_problem(dev_network, tmp_path, mutate, match):
    obj = _genesis_obj(dev_network)
    mutate(obj)
    path = tmp_path / "genesis.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ex.InvalidGenesis, match=match) as info:
        load_genesis(path)
    assert str(path) in str(info.value)


def test_genesis_file_not_found_or_not_json(tmp_path):
    with pytest.raises(ex.InvalidGenesis, match="not found"):
        load_genesis(tmp_path / "missing.json")
    (tmp_path / "g.json").write_text('{"chain_name": ')
    with pytest.raises(ex.InvalidGenesis, match="not valid JSON"):
        load_genesis(tmp_path / "g.json")


def test_genesis_params_may_be_partial(dev_network):
    obj = _genesis_obj(dev_network)
    obj["params"] = {"epoch_length": 7}
    genesis = genesis_from_json(json.dumps(obj))
    assert genesis.params == Params(epoch_length=7)
    assert initial_state(genesis).params.epoch_length == 7


# ---------------------------------------------------------------- chain store integration


def test_chain_persists_recovers_and_snapshots(dev_network, tmp_path):
    source = DevChain(dev_network)
    for i in range(7):
        source.produce([tx(source, "c0", Transfer, to=source.network.address("c1"), amount=1 + i)])
    with Chain.open(tmp_path / "node", dev_network.genesis, snapshot_interval=3) as chain:
        for fb in source.blocks:
            chain.commit(fb)
        assert chain.state.encode() == source.state.encode()
        assert chain.get_finalized(4) == source.blocks[3]
    with Chain.open(tmp_path / "node", dev_network.genesis, snapshot_interval=3) as again:
        assert again.height == 7
        assert again.state.encode() == source.state.encode()
        assert list(again.finalized_from(6)) == source.blocks[5:]


def test_chain_refuses_bad_blocks_and_other_chains(dev_network, tmp_path):
    source = DevChain(dev_network)
    source.produce()
    source.produce()
    with Chain.open(tmp_path / "node", dev_network.genesis) as chain:
        with pytest.raises(ex.InvalidBlock, match="on top of height 0"):
            chain.commit(source.blocks[1])
        bad_cert = dataclasses.replace(source.blocks[0].certificate, block_hash=b"\x01" * 32)
        with pytest.raises(ex.InvalidCertificate):
            chain.commit(FinalizedBlock(block=source.blocks[0].block, certificate=bad_cert))
        assert chain.height == 0 and chain.store.head_height is None
        chain.commit(source.blocks[0])
    other = make_dev_network(chain_name="other-net", validators=("v0",), providers=(), clients=())
    with pytest.raises(ChainError, match="holds chain"):
        Chain.open(tmp_path / "node", other.genesis)


def test_chain_recovers_after_torn_tail(dev_network, tmp_path):
    source = DevChain(dev_network)
    for _ in range(4):
        source.produce()
    with Chain.open(tmp_path / "node", dev_network.genesis, snapshot_interval=0) as chain:
        for fb in source.blocks:
            chain.commit(fb)
    log_path = tmp_path / "node" / "blocks.log"
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-7])  # a crash mid-append of block 4
    with Chain.open(tmp_path / "node", dev_network.genesis) as chain:
        assert chain.height == 3
        chain.commit(source.blocks[3])
        assert chain.state.encode() == source.state.encode()
