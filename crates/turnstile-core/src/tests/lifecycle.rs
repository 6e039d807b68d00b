//! Scenario tests of a semaphore's lifecycle: changing its capacity, deleting it, and taking a
//! lease away from its holder.

use super::*;

impl Check {
    fn set_capacity(&mut self, name: &str, capacity: u32) -> (Result<Reply, Error>, Vec<Effect>) {
        let (tag, out) = self.step(Request::SetCapacity { name, capacity });
        (reply_to(&out, tag).expect("set-capacity replies"), out)
    }

    fn delete(&mut self, name: &str) -> Result<Reply, Error> {
        let (tag, out) = self.step(Request::Delete { name });
        reply_to(&out, tag).expect("delete replies")
    }

    fn revoke(&mut self, name: &str, lease: u64) -> (Result<Reply, Error>, Vec<Effect>) {
        let (tag, out) = self.step(Request::Revoke {
            name,
            lease: LeaseId(lease),
        });
        (reply_to(&out, tag).expect("revoke replies"), out)
    }

    /// A coordinator rebuilt from every record so far, and one from its snapshot.
    fn restarted(&self) -> (Coordinator, Coordinator) {
        let mut replayed = Coordinator::new();
        for r in &self.log {
            replayed.apply(self.now, r);
        }
        replayed.validate().expect("replayed state is valid");
        let mut from_snapshot = Coordinator::new();
        for r in &replayed.snapshot() {
            from_snapshot.apply(self.now, r);
        }
        from_snapshot.validate().expect("snapshot state is valid");
        (replayed, from_snapshot)
    }
}

#[test]
fn growing_grants_queued_waiters_at_once_in_order() {
    let mut t = Check::new();
    for s in 1..=4 {
        t.open(s);
    }
    t.ensure("db", 1).expect("created");
    t.acquire(1, 1, "db", 1);
    let (heavy, _) = t.acquire(2, 1, "db", 1);
    let (behind, _) = t.acquire(3, 1, "db", 1);
    let (last, _) = t.acquire(4, 1, "db", 1);
    let (reply, out) = t.set_capacity("db", 3);
    assert_eq!(reply, Ok(Reply::Done));
    // The change is durable before the grants it causes, and they come in queue order.
    assert!(matches!(
        out[0],
        Effect::Persist(Record::Semaphore {
            capacity: 3,
            closed: false,
            ..
        })
    ));
    assert_eq!(reply_to(&out, heavy), granted(2));
    assert_eq!(reply_to(&out, behind), granted(3));
    assert_eq!(reply_to(&out, last), None);
    assert_eq!(t.view("db").capacity, 3);
    assert_eq!(t.view("db").in_use, 3);
    // The same capacity again changes nothing and records nothing.
    let (reply, out) = t.set_capacity("db", 3);
    assert_eq!(reply, Ok(Reply::Done));
    assert!(!out.iter().any(|e| matches!(e, Effect::Persist(_))));
}

#[test]
fn growing_keeps_a_heavy_head_ahead_of_lighter_waiters() {
    let mut t = Check::new();
    for s in 1..=3 {
        t.open(s);
    }
    t.ensure("db", 2).expect("created");
    t.acquire(1, 1, "db", 2);
    let (heavy, _) = t.acquire(2, 1, "db", 2);
    let (light, _) = t.acquire(3, 1, "db", 1);
    // One more permit: the light waiter would fit, the heavy head still does not.
    let (_, out) = t.set_capacity("db", 3);
    assert_eq!(reply_to(&out, heavy), None);
    assert_eq!(reply_to(&out, light), None, "overtook the heavy head");
    let (_, out) = t.set_capacity("db", 4);
    assert_eq!(reply_to(&out, heavy), granted(2));
    assert_eq!(reply_to(&out, light), None, "heavy head granted, then full");
}

#[test]
fn shrinking_lets_holders_finish_and_grants_nothing_until_in_use_fits() {
    let mut t = Check::new();
    for s in 1..=4 {
        t.open(s);
    }
    t.ensure("db", 3).expect("created");
    for s in 1..=3 {
        t.acquire(s, 1, "db", 1);
    }
    let (waiter, _) = t.acquire(4, 1, "db", 1);
    let (reply, out) = t.set_capacity("db", 1);
    assert_eq!(reply, Ok(Reply::Done));
    assert_eq!(reply_to(&out, waiter), None);
    let v = t.view("db");
    assert_eq!((v.capacity, v.in_use, v.holders.len()), (1, 3, 3));
    // Over capacity across a restart too: the snapshot writes the capacity before the grants.
    let (replayed, from_snapshot) = t.restarted();
    for c in [&replayed, &from_snapshot] {
        let v = c.semaphore("db", t.now).expect("db");
        assert_eq!((v.capacity, v.in_use, v.holders.len()), (1, 3, 3));
    }
    // 3 -> 2 -> 1 held: still nothing free for the waiter.
    let out = t.release(1, 1);
    assert_eq!(reply_to(&out, waiter), None);
    let out = t.release(2, 1);
    assert_eq!(reply_to(&out, waiter), None);
    let out = t.release(3, 1);
    assert_eq!(reply_to(&out, waiter), granted(4));
    assert_eq!(t.view("db").in_use, 1);
}

#[test]
fn shrinking_fails_waiters_heavier_than_the_new_capacity() {
    let mut t = Check::new();
    for s in 1..=3 {
        t.open(s);
    }
    t.ensure("db", 4).expect("created");
    t.acquire(1, 1, "db", 4);
    let (heavy, _) = t.acquire(2, 1, "db", 3);
    let (light, _) = t.acquire(3, 1, "db", 1);
    let (_, out) = t.set_capacity("db", 2);
    assert_eq!(
        reply_to(&out, heavy),
        Some(Err(Error::WeightExceedsCapacity {
            name: "db".into(),
            weight: 3,
            capacity: 2,
        }))
    );
    assert_eq!(reply_to(&out, light), None, "the holder still has 4");
    let out = t.release(1, 1);
    assert_eq!(reply_to(&out, light), granted(2));
}

#[test]
fn set_capacity_refuses_bad_requests() {
    let mut t = Check::new();
    assert_eq!(
        t.set_capacity("nope", 2).0,
        Err(Error::NoSuchSemaphore("nope".into()))
    );
    t.ensure("db", 1).expect("created");
    assert!(matches!(
        t.set_capacity("db", 0).0,
        Err(Error::InvalidArgument(_))
    ));
    t.step(Request::Close { name: "db" });
    assert_eq!(t.set_capacity("db", 2).0, Err(Error::Closed("db".into())));
    // A job's lock is not a client's semaphore.
    assert!(matches!(
        t.set_capacity("\u{1}job", 2).0,
        Err(Error::InvalidArgument(_))
    ));
    // An acquire or ensure that names another capacity still fails: set-capacity is the
    // one way to change it.
    t.ensure("other", 2).expect("created");
    t.set_capacity("other", 3).0.expect("changed");
    assert!(matches!(
        t.ensure("other", 2),
        Err(Error::CapacityMismatch {
            existing: 3,
            requested: 2,
            ..
        })
    ));
}

#[test]
fn delete_frees_the_name_and_tokens_still_increase() {
    let mut t = Check::new();
    let first = use_name(&mut t, 1, "bench-1", 3);
    assert_eq!(t.delete("bench-1"), Ok(Reply::Done));
    assert!(t.c.semaphore("bench-1", t.now).is_none());
    assert_eq!(
        t.delete("bench-1"),
        Err(Error::NoSuchSemaphore("bench-1".into()))
    );
    // Created afresh with another capacity: no mismatch, and tokens go on above the old ones.
    t.open(2);
    t.ensure("bench-1", 5).expect("created afresh");
    let (_, out) = t.acquire(2, 1, "bench-1", 5);
    let again = token_in(&out);
    assert!(again > first, "token {again} after {first}");
    t.release(2, 1);
    // Across a restart (log and snapshot) as well.
    t.delete("bench-1").expect("deleted again");
    let (replayed, from_snapshot) = t.restarted();
    for c in [replayed, from_snapshot] {
        assert!(c.semaphore("bench-1", t.now).is_none());
        let mut t2 = Check::new();
        t2.c = c;
        t2.now = t.now;
        let later = use_name(&mut t2, 9, "bench-1", 1);
        assert!(
            later > again,
            "token {later} after {again} across a restart"
        );
    }
}

#[test]
fn delete_refuses_a_semaphore_in_use_unless_closed() {
    let mut t = Check::new();
    t.open(1);
    t.open(2);
    t.ensure("db", 1).expect("created");
    t.acquire(1, 1, "db", 1);
    t.acquire(2, 1, "db", 1);
    assert_eq!(
        t.delete("db"),
        Err(Error::InUse {
            name: "db".into(),
            holders: 1,
            waiters: 1
        })
    );
    assert_eq!(t.view("db").in_use, 1, "a refused delete changes nothing");
    // Closing takes every lease away: then it can go.
    t.step(Request::Close { name: "db" });
    assert_eq!(t.delete("db"), Ok(Reply::Done));
    // And the name is open again (not closed).
    t.ensure("db", 1).expect("created afresh");
    let (_, out) = t.acquire(1, 2, "db", 1);
    assert!(token_in(&out) > 1);
    let (replayed, _) = t.restarted();
    assert!(!replayed.semaphore("db", t.now).expect("db").closed);
}

#[test]
fn revoke_frees_the_lease_tells_its_holder_and_grants_the_next() {
    let mut t = Check::new();
    t.open(1);
    t.open(2);
    t.ensure("db", 1).expect("created");
    t.acquire(1, 7, "db", 1);
    let (waiter, _) = t.acquire(2, 8, "db", 1);
    let (reply, out) = t.revoke("db", 7);
    assert_eq!(reply, Ok(Reply::Done));
    assert_eq!(
        out,
        vec![
            Effect::Persist(Record::Released {
                session: SessionId(1),
                lease: LeaseId(7),
            }),
            Effect::Event(Event::LeaseLost {
                session: SessionId(1),
                lease: LeaseId(7),
                semaphore: Arc::from("db"),
                token: Token(1),
                client: Arc::from("test"),
                reason: LostReason::Revoked,
            }),
            Effect::Persist(Record::Granted {
                session: SessionId(2),
                lease: LeaseId(8),
                semaphore: Arc::from("db"),
                weight: 1,
                token: Token(2),
            }),
            Effect::Reply {
                tag: waiter,
                outcome: Ok(Reply::Granted { token: Token(2) }),
            },
            Effect::Reply {
                tag: Tag(t.next_tag - 1),
                outcome: Ok(Reply::Done),
            },
        ]
    );
    assert_eq!(t.view("db").counters.lost_total, 1);
    // The holder's session lives on; its own release now finds nothing.
    assert!(t.c.has_session(SessionId(1)));
    let out = t.release(1, 7);
    assert_eq!(reply_of(&out), Some(Err(Error::UnknownLease(LeaseId(7)))));
    // A queued acquire, an unknown id or name are refused.
    t.acquire(1, 9, "db", 1);
    assert_eq!(t.revoke("db", 9).0, Err(Error::UnknownLease(LeaseId(9))));
    assert_eq!(t.revoke("db", 99).0, Err(Error::UnknownLease(LeaseId(99))));
    assert_eq!(
        t.revoke("nope", 8).0,
        Err(Error::NoSuchSemaphore("nope".into()))
    );
    let (replayed, _) = t.restarted();
    let v = replayed.semaphore("db", t.now).expect("db");
    assert_eq!(v.holders.len(), 1);
    assert_eq!(v.holders[0].lease, LeaseId(8));
}

/// Found by the model test: a client that re-sends the acquire of a lease it holds (after a
/// reconnect) got `WeightExceedsCapacity` once a shrink made the lease heavier than the
/// capacity, instead of its grant.
#[test]
fn a_retried_acquire_of_a_held_lease_survives_a_shrink() {
    let mut t = Check::new();
    t.open(1);
    t.ensure("db", 3).expect("created");
    let (_, out) = t.acquire(1, 1, "db", 3);
    let token = token_in(&out);
    t.set_capacity("db", 1).0.expect("shrunk");
    let (_, out) = t.acquire(1, 1, "db", 3);
    assert_eq!(reply_of(&out), granted(token));
    // A new lease that heavy is refused.
    let (_, out) = t.acquire(1, 2, "db", 3);
    assert!(matches!(
        reply_of(&out),
        Some(Err(Error::WeightExceedsCapacity { .. }))
    ));
}
