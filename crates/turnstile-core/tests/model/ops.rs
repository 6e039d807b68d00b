//! The operations of a generated run, and their proptest generator.

use super::*;

/// One step of a generated run.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Open {
        session: u64,
        ttl_ms: u64,
    },
    Resume {
        session: u64,
    },
    KeepAlive {
        session: u64,
    },
    CloseSession {
        session: u64,
    },
    EndSession {
        session: u64,
    },
    Ensure {
        name: &'static str,
        capacity: u32,
    },
    Acquire {
        session: u64,
        lease: u64,
        name: &'static str,
        weight: u32,
        timeout_ms: Option<u64>,
    },
    /// Repeats an earlier acquire (same session, lease, name and weight), with a new timeout.
    Retry {
        which: Index,
        timeout_ms: Option<u64>,
    },
    /// Releases the lease of an earlier acquire.
    ReleaseKnown {
        which: Index,
    },
    /// Releases any lease id, most likely one never acquired.
    Release {
        session: u64,
        lease: u64,
    },
    /// Moves the clock, ticking at every deadline on the way.
    Advance {
        ms: u64,
    },
    /// Moves the clock without ticking.
    Jump {
        ms: u64,
    },
    Close {
        name: &'static str,
    },
    /// Compacts the log into a `Coordinator::snapshot`.
    Snapshot,
    /// Changes a semaphore's capacity.
    SetCapacity {
        name: &'static str,
        capacity: u32,
    },
    /// Deletes a semaphore (refused while it is in use).
    Delete {
        name: &'static str,
    },
    /// Takes away the lease of an earlier acquire by force (refused unless it is held).
    RevokeKnown {
        which: Index,
    },
}

/// Timeouts: none, zero, random, or one of the TTLs (so that a timeout and a session expiry
/// can fall on the same instant).
pub(crate) fn timeout_ms() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(0)),
        2 => (1u64..=2_000).prop_map(Some),
        1 => select(TTLS_MS.to_vec()).prop_map(Some),
    ]
}

pub(crate) fn ttl_ms() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(TTLS_MS[0]), 2 => Just(TTLS_MS[1]), 3 => Just(TTLS_MS[2])]
}

pub(crate) fn clock_ms() -> impl Strategy<Value = u64> {
    prop_oneof![5 => 0u64..=50, 2 => 0u64..=1_500, 1 => 0u64..=15_000]
}

/// Light acquires are more common, so that queues form behind the heavy ones.
pub(crate) fn weight() -> impl Strategy<Value = u32> {
    prop_oneof![4 => Just(1u32), 3 => Just(2), 2 => Just(3), 1 => Just(4)]
}

/// Operation weights: `[sessions, ensure, acquire, retry, release, clock, close, snapshot,
/// lifecycle]` (lifecycle: set-capacity, delete, revoke).
pub(crate) fn op(w: [u32; 9]) -> impl Strategy<Value = Op> {
    let [w_session, w_ensure, w_acquire, w_retry, w_release, w_clock, w_close, w_snapshot, w_life] =
        w;
    let session = || select(SESSIONS.to_vec());
    let name = || select(NAMES.to_vec());
    let sessions = prop_oneof![
        3 => (session(), ttl_ms())
            .prop_map(|(session, ttl_ms)| Op::Open { session, ttl_ms }),
        1 => session().prop_map(|session| Op::Resume { session }),
        4 => session().prop_map(|session| Op::KeepAlive { session }),
        1 => session().prop_map(|session| Op::CloseSession { session }),
        1 => session().prop_map(|session| Op::EndSession { session }),
    ];
    let acquire = (session(), 1u64..=8, name(), weight(), timeout_ms()).prop_map(
        |(session, lease, name, weight, timeout_ms)| Op::Acquire {
            session,
            lease,
            name,
            weight,
            timeout_ms,
        },
    );
    let release = prop_oneof![
        4 => any::<Index>().prop_map(|which| Op::ReleaseKnown { which }),
        1 => (session(), 1u64..=8).prop_map(|(session, lease)| Op::Release { session, lease }),
    ];
    let clock = prop_oneof![
        3 => clock_ms().prop_map(|ms| Op::Advance { ms }),
        1 => clock_ms().prop_map(|ms| Op::Jump { ms }),
    ];
    prop_oneof![
        w_session => sessions,
        w_ensure => (name(), 1u32..=4).prop_map(|(name, capacity)| Op::Ensure { name, capacity }),
        w_acquire => acquire,
        w_retry => (any::<Index>(), timeout_ms())
            .prop_map(|(which, timeout_ms)| Op::Retry { which, timeout_ms }),
        w_release => release,
        w_clock => clock,
        w_close => name().prop_map(|name| Op::Close { name }),
        w_snapshot => Just(Op::Snapshot),
        w_life => prop_oneof![
            3 => (name(), 1u32..=4)
                .prop_map(|(name, capacity)| Op::SetCapacity { name, capacity }),
            1 => name().prop_map(|name| Op::Delete { name }),
            2 => any::<Index>().prop_map(|which| Op::RevokeKnown { which }),
        ],
    ]
}

/// A run: a setup (most semaphores created, most sessions opened) and then random operations
/// with the given weights. The setup goes through the same checks as the rest.
pub(crate) fn run(w: [u32; 9], len: usize) -> impl Strategy<Value = Vec<Op>> {
    let setup = (
        [(); 3].map(|()| prop::option::weighted(0.8, 1u32..=4)),
        [(); 4].map(|()| prop::option::weighted(0.8, ttl_ms())),
    )
        .prop_map(|(capacities, ttls)| {
            let sems = NAMES
                .into_iter()
                .zip(capacities)
                .filter_map(|(name, c)| c.map(|capacity| Op::Ensure { name, capacity }));
            let sessions = SESSIONS
                .into_iter()
                .zip(ttls)
                .filter_map(|(session, t)| t.map(|ttl_ms| Op::Open { session, ttl_ms }));
            sems.chain(sessions).collect::<Vec<Op>>()
        });
    (setup, prop::collection::vec(op(w), 1..len)).prop_map(|(mut setup, ops)| {
        setup.extend(ops);
        setup
    })
}
