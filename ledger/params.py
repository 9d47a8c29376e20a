"""Chain parameters, fixed at genesis.

Amounts are integers in the chain's smallest unit; fractions are basis
points (1/10,000) so every computation is exact integer arithmetic and every
node gets the same answer. Durations are in blocks: the ledger has no clock.
"""

from __future__ import annotations

from ledger.codec import U8, U16, U32, U64, Record, record

BPS = 10_000


@record
class Params(Record):
    # consensus
    epoch_length: U32 = 32  # blocks per epoch; committees rotate at its boundary
    committee_size: U16 = 64  # C: at most this many validators sign each block
    min_validator_stake: U64 = 1_000
    unbonding_period: U32 = 64  # blocks before unbonded stake is paid out
    double_sign_slash_bps: U16 = 5_000  # share of stake slashed for a double vote
    evidence_reward_bps: U16 = 1_000  # share of the slashed amount paid to the reporter
    jail_period: U32 = 128  # blocks a jailed validator stays out of committees
    block_reward: U64 = 0  # minted to each block's proposer
    max_block_txs: U32 = 5_000
    # fees
    min_fee: U64 = 1
    protocol_fee_bps: U16 = 100  # share of a task's price kept by the protocol (to the fee pool)
    # market
    collateral_bps: U16 = 2_000  # provider collateral locked per task, as a share of its price
    audit_fee: U64 = 10  # escrowed by the client with every task; pays the verifiers
    max_bid_window: U32 = 1_000
    max_exec_blocks: U32 = 10_000
    challenge_window: U32 = 10  # blocks after CommitResult in which the client may dispute (and fetch its result)
    audit_window: U32 = 20  # blocks verifiers have to attest
    verifier_count: U16 = 2
    dispute_bond: U64 = 50
    missed_deadline_slash_bps: U16 = 5_000  # share of collateral slashed when a provider misses its deadline
    reopen_after_blocks: U32 = 2
    """Blocks after Assign before its client may take the task back (ReopenTask): the provider gets at least
    this long to show it is alive, and an Assign cannot be undone in the block after it lands."""
    reopen_slash_bps: U16 = 1_000
    """Share of collateral burned when a client reopens a task from a provider that stopped. Lower than a
    missed deadline's: the client's word that the provider stopped is not proven on the ledger, so a client
    that reopens an honest provider's task costs it this much at most (and gains nothing: it is burned)."""
    max_reopens: U8 = 3
    """Times one task may be reopened: failover is for providers that stop, not an endless auction."""
    reservation_fee_bps: U16 = 500
    """Share of the price a client pays the provider when the provider reports that it could not fetch the
    task's inputs (InputsUnavailable): the slot it held is paid for, so a client cannot make providers wait
    for inputs it never serves for free; small, so claiming it is worth far less than doing the job."""
    fraud_client_share_bps: U16 = 5_000  # of slashed collateral on fraud: to the client
    fraud_verifier_share_bps: U16 = 2_500  # of slashed collateral on fraud: to the verifiers (rest burned)
    min_provider_bond: U64 = 100
    max_stream_units: U32 = 1_000_000
    task_retention: U32 = 64
    """Blocks a settled task stays in the state before it is pruned. Followers (clients fetching a paid
    result, providers, verifiers) see it settle well within this; past it, the state (its root is re-encoded
    every block, and end-of-block scans every task) grows with the tasks in flight, not with every task ever."""
    # model registry
    model_registration_fee: U64 = 100
    """Burned by every RegisterModel: a name costs something, so squatting many costs many times that (and
    burned, not paid to the fee pool, so a proposer cannot register names in its own blocks for free)."""
    max_royalty_per_unit: U64 = 1_000_000
    """The most a model's owner may charge per unit of work with it: bounds what one task can escrow for it."""
