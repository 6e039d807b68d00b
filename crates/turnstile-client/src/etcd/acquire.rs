//! Acquiring: the create txn, waiting for a turn (watches of the keys ahead and of the
//! capacity markers), and watching a holder's key once it holds.

use super::*;

impl Inner {
    /// Opens a watch of deletions of `key` (or of everything under it with `prefix`) from
    /// revision `from`, on the endpoint in use, failing over until `deadline`.
    pub(super) async fn open_watch(
        &self,
        key: &str,
        prefix: bool,
        from: i64,
        deletes_only: bool,
        deadline: Option<Instant>,
    ) -> Result<Stream, WaitEnd> {
        let end = prefix.then(|| range_end(key));
        self.open_watch_range(key, end, from, deletes_only, deadline)
            .await
    }

    /// [`Inner::open_watch`] of the keys from `key` up to `end` (base64), if given.
    pub(super) async fn open_watch_range(
        &self,
        key: &str,
        end: Option<String>,
        from: i64,
        deletes_only: bool,
        deadline: Option<Instant>,
    ) -> Result<Stream, WaitEnd> {
        let mut req = json!({"key": b64(key.as_bytes()), "start_revision": from.to_string()});
        if let Some(end) = end {
            req["range_end"] = json!(end);
        }
        if deletes_only {
            req["filters"] = json!(["NOPUT"]);
        }
        let body = json!({ "create_request": req });
        loop {
            let (i, addr) = self.etcd.endpoint();
            let mut attempt = ATTEMPT;
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(WaitEnd::TimedOut);
                }
                attempt = attempt.min(left);
            }
            match tokio::time::timeout(
                attempt,
                Stream::open(&self.etcd.pool, addr, "/v3/watch", &body),
            )
            .await
            {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(f)) if !f.retryable() => {
                    return Err(WaitEnd::Failed(Error::Protocol(format!(
                        "etcd watch at {addr}: {f:?}"
                    ))))
                }
                _ => {
                    self.etcd.fail_over(i);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Waits until the keys in `ahead` (key -> weight and create revision) weigh at most
    /// `room`, watching
    /// deletions under `queue` from revision `from`. Returns the revision to go on from.
    /// With `resize` (a semaphore's waiter), it also follows the capacity: one watch of the
    /// cap key's change markers ([`bump_keys`]) and the queue together, so that a change
    /// comes in revision order with the deletions.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn wait_turn(
        &self,
        queue: &str,
        mine: &str,
        mut ahead: HashMap<String, (u64, i64)>,
        mut room: u64,
        mut from: i64,
        deadline: Option<Instant>,
        mut resize: Option<Resize<'_>>,
    ) -> Result<i64, WaitEnd> {
        let mut weight: u64 = ahead.values().map(|(w, _)| w).sum();
        let turn = |weight: u64, room: u64, r: &Option<Resize<'_>>| {
            weight <= room || r.as_ref().is_some_and(|r| r.create <= r.held_to)
        };
        while !turn(weight, room, &resize) {
            let mut stream = match &resize {
                Some(r) => {
                    let end = Some(range_end(queue));
                    self.open_watch_range(r.cap_key, end, from, true, deadline)
                        .await?
                }
                None => self.open_watch(queue, true, from, true, deadline).await?,
            };
            loop {
                let quiet = Instant::now() + WATCH_QUIET;
                let until = deadline.map_or(quiet, |d| d.min(quiet));
                let msg = match tokio::time::timeout_at(until, stream.next()).await {
                    Ok(Ok(m)) => m,
                    Ok(Err(_)) => break,
                    Err(_) => {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            return Err(WaitEnd::TimedOut);
                        }
                        break; // quiet: re-open, perhaps on another member
                    }
                };
                if msg.get("canceled").and_then(Value::as_bool) == Some(true) {
                    if num(&msg, "compact_revision") == 0 {
                        return Err(WaitEnd::Failed(Error::Protocol(format!(
                            "etcd cancelled a watch: {msg}"
                        ))));
                    }
                    // `from` was compacted away (the watch was re-opened after a quiet spell
                    // or a fail-over, and a compaction ran meanwhile): the deletions in the
                    // gap cannot be replayed, so read what is left of the queue instead.
                    // Keys ahead only ever go away, so the ones still there are what is
                    // still in the way.
                    let until = deadline.map_or(self.deadline(), |d| d.min(self.deadline()));
                    let (queued, rev) = match self.list_until(queue, until).await {
                        Ok(read) => read,
                        Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                            return Err(WaitEnd::TimedOut)
                        }
                        Err(e) => return Err(WaitEnd::Failed(e)),
                    };
                    if !queued.iter().any(|kv| kv.key == mine) {
                        return Err(WaitEnd::Deleted);
                    }
                    // A key name is reused (a client's slot, see `acquire`): only the same
                    // incarnation (same create revision) is still ahead; a re-created one
                    // is behind us.
                    ahead.retain(|k, (_, c)| {
                        queued.iter().any(|kv| kv.key == *k && kv.create == *c)
                    });
                    weight = ahead.values().map(|(w, _)| w).sum();
                    from = rev + 1;
                    break;
                }
                for ev in msg
                    .get("events")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(kv) = ev.get("kv").map(kv_of) else {
                        continue;
                    };
                    from = from.max(kv.modr + 1);
                    let deleted = ev.get("type").and_then(Value::as_str) == Some("DELETE");
                    if let Some(r) = resize.as_mut().filter(|r| kv.key.starts_with(r.cap_key)) {
                        if !bump_keys(r.cap_key).contains(&kv.key) {
                            continue;
                        }
                        // The capacity changed at this revision: read it now. Read later
                        // than the queue events so far, it can only be as new or newer, and
                        // with the keys ahead as of then (a superset of those now) the rule
                        // still grants only a key that holds.
                        let cap = match self.get(r.cap_key).await {
                            Ok((Some(cap), _)) => cap.value,
                            Ok((None, _)) => continue,
                            Err(e) => return Err(WaitEnd::Failed(e)),
                        };
                        // A close (or a delete) also deletes the queue: our key's deletion
                        // follows and ends the wait.
                        if is_closed(&cap) {
                            continue;
                        }
                        (r.capacity, r.held_to) = (capacity_of(&cap), held_to_of(&cap));
                        if r.weight > r.capacity {
                            return Err(WaitEnd::Failed(too_heavy(r.name, r.weight, r.capacity)));
                        }
                        room = r.capacity - r.weight;
                        continue;
                    }
                    if !deleted {
                        continue;
                    }
                    if kv.key == mine {
                        return Err(WaitEnd::Deleted);
                    }
                    if let Some((w, _)) = ahead.remove(&kv.key) {
                        weight -= w;
                    }
                }
                if turn(weight, room, &resize) {
                    break;
                }
            }
        }
        Ok(from)
    }

    /// Registers a grant; its key is watched from [`HOLDER_WATCH_DELAY`] after it (see
    /// [`Inner::start_watches`]), so that its holder hears of a close or of the lease's end.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn hold(
        self: &Arc<Self>,
        lease: u64,
        key: String,
        cap: Option<String>,
        job: Option<String>,
        token: u64,
        from: i64,
        slot: Option<Slot>,
    ) -> crate::lost::LostReceiver {
        let (tx, rx) = crate::lost::channel();
        // The watch is started later by `start_watches`: a watch replays from `from`, so
        // opening it late misses nothing; most holds are short and end before it, and then
        // cost no watch at all, and no task either (a task spawned and aborted per grant
        // woke the runtime's other worker twice per pair).
        let held = Held {
            key,
            job,
            token,
            lost: tx,
            watcher: None,
            pending: Some(PendingWatch {
                cap,
                from,
                etcd_lease: self.lease.load(Ordering::SeqCst),
                granted: Instant::now(),
            }),
            slot,
        };
        if let Ok(mut g) = self.grants.lock() {
            g.insert(lease, held);
        }
        if self.starter_idle.swap(false, Ordering::SeqCst) {
            self.starter_wake.notify_one();
        }
        rx
    }

    /// Starts the watches of the grants held for [`HOLDER_WATCH_DELAY`], looking every half
    /// of it; sleeps until the next grant after [`WATCH_STARTER_IDLE`] without any.
    pub(super) async fn start_watches(self: Arc<Self>) {
        let tick = HOLDER_WATCH_DELAY / 2;
        let mut last_busy = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            let empty = match self.grants.lock() {
                Ok(mut grants) => {
                    for (&lease, h) in grants.iter_mut() {
                        if h.pending
                            .as_ref()
                            .is_some_and(|p| now >= p.granted + HOLDER_WATCH_DELAY)
                        {
                            if let Some(p) = h.pending.take() {
                                h.watcher = Some(self.watch_held(lease, h.key.clone(), p));
                            }
                        }
                    }
                    grants.is_empty()
                }
                Err(_) => return,
            };
            if !empty {
                last_busy = now;
                continue;
            }
            if now.duration_since(last_busy) < WATCH_STARTER_IDLE {
                continue;
            }
            // Idle: sleep until `hold` wakes us. A grant made between the look above and
            // the flag is seen by the look below; one made after it sees the flag.
            self.starter_idle.store(true, Ordering::SeqCst);
            let any = self.grants.lock().map(|g| !g.is_empty()).unwrap_or(false);
            if any {
                self.starter_idle.store(false, Ordering::SeqCst);
            } else {
                self.starter_wake.notified().await;
            }
            last_busy = Instant::now();
        }
    }

    /// Watches a holder's key (from the grant's revision) for its deletion: a close, a
    /// revoke, or its lease's end noticed by etcd; then the grant is lost.
    pub(super) fn watch_held(
        self: &Arc<Self>,
        lease: u64,
        wkey: String,
        p: PendingWatch,
    ) -> AbortHandle {
        let inner = self.clone();
        let PendingWatch {
            cap: wcap,
            from,
            etcd_lease,
            ..
        } = p;
        tokio::spawn(async move {
            let mut from = from;
            loop {
                let Ok(mut s) = inner.open_watch(&wkey, false, from, true, None).await else {
                    return;
                };
                while let Ok(Ok(msg)) = tokio::time::timeout(WATCH_QUIET, s.next()).await {
                    if num(&msg, "compact_revision") > 0 {
                        // `from` was compacted away: whether the key is still there says
                        // what the lost events would have (see `wait_turn`).
                        match inner.get(&wkey).await {
                            Ok((Some(_), rev)) => from = rev + 1,
                            Ok((None, _)) => {
                                let reason = inner.why_lost(wcap.as_deref(), etcd_lease).await;
                                inner.lose(lease, reason);
                                return;
                            }
                            // Unreachable: the keep-alive decides about the lease.
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                        break;
                    }
                    let events = msg.get("events").and_then(Value::as_array);
                    for ev in events.into_iter().flatten() {
                        if let Some(kv) = ev.get("kv").map(kv_of) {
                            from = from.max(kv.modr + 1);
                        }
                        if ev.get("type").and_then(Value::as_str) == Some("DELETE") {
                            let reason = match inner.get(&revoked_of(&wkey, lease)).await {
                                Ok((Some(_), _)) => LostReason::Revoked,
                                _ => inner.why_lost(wcap.as_deref(), etcd_lease).await,
                            };
                            inner.lose(lease, reason);
                            return;
                        }
                    }
                }
            }
        })
        .abort_handle()
    }

    /// Acquires `weight` of semaphore `name`. The key is one of this client's slots
    /// ([`Slot`]); one txn creates it (and moves its tombstone on), checks the capacity
    /// (compared against the cached cap key's mod revision, or read when none is cached)
    /// and counts the queue. A key alone in the queue holds at once.
    pub(super) async fn acquire(
        self: Arc<Self>,
        name: &str,
        weight: u32,
        timeout: Option<Duration>,
    ) -> Result<Grant, Error> {
        self.check_open()?;
        validate("semaphore name", name)?;
        if weight == 0 {
            return Err(invalid("the weight is zero".into()));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let cap_key = self.cap_key(name);
        let queue = self.queue(name);
        let lease = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let record = json!({"w": weight, "s": format!("{:016x}", self.session), "c": self.client, "t": now_ms(), "l": lease});
        let mut guard = Withdraw {
            inner: self.clone(),
            key: None,
            slot: Some(self.take_slot(name)),
        };
        // Only the count of the queue, not its keys: when the new key is alone (the common,
        // uncontended case) it holds at once, and its create revision is the txn's own;
        // every key-value returned costs etcd CPU (BENCHMARKS.md).
        let mut count_queue = range_prefix(&queue);
        count_queue["count_only"] = json!(true);
        let mut conflicts = 0;
        let (r, etcd_lease, key, cap, count_at) = loop {
            let etcd_lease = self.lease.load(Ordering::SeqCst);
            let Some(slot) = guard.slot.as_mut() else {
                return Err(Error::Protocol("an acquire lost its slot".into()));
            };
            if slot.etcd_lease != etcd_lease {
                // A new etcd lease: new names, whose tombstones do not exist yet.
                (slot.etcd_lease, slot.fence) = (etcd_lease, 0);
            }
            let key = format!("{queue}{etcd_lease:016x}.{}", slot.n);
            let tomb = tomb_of(&key);
            // From here the key may exist until it is withdrawn or granted.
            guard.key = Some(key.clone());
            let cached = self.cached_cap(name);
            // The smallest txn that says it (written when etcd's JSON gateway decoded each
            // field by reflection, which cost etcd more than the rest of the txn; over gRPC
            // a smaller message is still less for etcd to decode, BENCHMARKS.md). Hence no
            // failure branch (a failed compare is rare: a second request reads what is
            // needed), and compares with protobuf's defaults left out (`result` EQUAL, a
            // zero revision). The key-absent
            // compare is implied by the tombstone's (every create moves it, and a slot is
            // reused only once its key is gone), and kept as a cheap second guard of the
            // token: a put over an existing key would keep its old create revision.
            let mut compare = vec![
                json!({"key": b64(key.as_bytes()), "target": "CREATE"}),
                mod_is(&tomb, slot.fence),
            ];
            let mut success = vec![
                put(&key, &record, etcd_lease),
                put(&tomb, &json!({ "l": lease }), etcd_lease),
            ];
            match &cached {
                Some((_, modr)) => compare.push(mod_is(&cap_key, *modr)),
                None => success.push(json!({"request_range": range(&cap_key)})),
            }
            let count_at = success.len();
            success.push(json!({ "request_range": count_queue.clone() }));
            let body = json!({"compare": compare, "success": success});
            let r = match self.txn(body).await {
                Err(Error::Protocol(m)) if m.contains("lease not found") => {
                    // The key cannot have been made under a lease etcd does not know.
                    guard.disarm();
                    self.await_new_lease(etcd_lease, deadline).await?;
                    continue;
                }
                Err(e) => return Err(e),
                Ok(r) => r,
            };
            if succeeded(&r) {
                // The tombstone's mod revision is now the txn's (and the key's create).
                slot.fence = header_rev(&r);
                let cap = match cached {
                    Some((value, _)) => value,
                    None => {
                        let Some(cap) = kvs(&txn_part(&r, 2)).into_iter().next() else {
                            let _ = guard.now().await;
                            self.cache_cap(name, None);
                            return Err(no_such(name));
                        };
                        self.cache_cap(name, Some((cap.value.clone(), cap.modr)));
                        cap.value
                    }
                };
                break (r, etcd_lease, key, cap, Some(count_at));
            }
            // A compare failed: read the key, the tombstone and the cap key (one revision).
            let reads = vec![
                json!({"request_range": range(&key)}),
                json!({"request_range": range(&tomb)}),
                json!({"request_range": range(&cap_key)}),
            ];
            let r = self.txn(txn(vec![], reads, vec![])).await?;
            let mine = kvs(&txn_part(&r, 0)).into_iter().next();
            let tombstone = kvs(&txn_part(&r, 1)).into_iter().next();
            let cap = kvs(&txn_part(&r, 2)).into_iter().next();
            self.cache_cap(name, cap.as_ref().map(|c| (c.value.clone(), c.modr)));
            slot.fence = tombstone.as_ref().map_or(0, |t| t.modr);
            let ours = tombstone
                .as_ref()
                .and_then(|t| t.value.get("l").and_then(Value::as_u64))
                == Some(lease);
            if ours {
                // An earlier attempt of this very txn was applied (its answer was lost and
                // the call retried it): the key is ours, if still there; the queue read
                // below finds it.
                let Some(cap) = cap else {
                    guard.disarm();
                    return Err(no_such(name));
                };
                break (r, etcd_lease, key, cap.value, None);
            }
            if mine.is_some() {
                // A key of an earlier acquire of ours in this slot is still there (its
                // release failed): leave the name alone and take another.
                guard.disarm();
                guard.slot = Some(self.new_slot(name));
            } else {
                // Nothing was created (a stale fence, or the capacity changed).
                guard.disarm();
                if cap.is_none() {
                    return Err(no_such(name));
                }
            }
            conflicts += 1;
            if conflicts > 16 {
                return Err(Error::Protocol(format!(
                    "etcd: the acquire txn on semaphore {name:?} kept failing its compares"
                )));
            }
        };
        let capacity = capacity_of(&cap);
        if is_closed(&cap) {
            let _ = guard.now().await;
            return Err(closed(name));
        }
        if u64::from(weight) > capacity {
            let _ = guard.now().await;
            return Err(too_heavy(name, weight.into(), capacity));
        }
        let alone = count_at.is_some_and(|i| num(&txn_part(&r, i), "count") == 1);
        let (ahead, rev, token) = if alone {
            // Alone in the queue: the txn's revision is the key's create revision.
            let rev = header_rev(&r);
            (HashMap::new(), rev, rev as u64)
        } else {
            // Others queued (or a retry found the key made): read the queue. Keys ahead
            // of ours only ever go away, so a read after the txn sees a subset of them.
            // A timed acquire's deadline bounds this read too (not a try: it must read).
            let until = match deadline.filter(|_| timeout != Some(Duration::ZERO)) {
                Some(d) => d.min(self.deadline()),
                None => self.deadline(),
            };
            let (queued, rev) = match self.list_until(&queue, until).await {
                Ok(read) => read,
                Err(e) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        // As when the wait times out (below): withdraw, or say unreachable.
                        let w = tokio::time::timeout(Duration::from_millis(500), guard.now());
                        return match w.await {
                            Ok(Ok(())) => Err(Error::TimedOut),
                            _ => Err(self.etcd.unavailable()),
                        };
                    }
                    return Err(e);
                }
            };
            let Some(me) = queued.iter().find(|kv| kv.key == key) else {
                guard.disarm();
                return Err(self.gone(name, &cap_key, etcd_lease).await);
            };
            let ahead: HashMap<String, (u64, i64)> = queued
                .iter()
                .filter(|kv| kv.create < me.create)
                .map(|kv| (kv.key.clone(), (weight_of(kv), kv.create)))
                .collect();
            (ahead, rev, me.create as u64)
        };
        let room = capacity - u64::from(weight);
        let deadline = if timeout == Some(Duration::ZERO) {
            Some(Instant::now())
        } else {
            deadline
        };
        let resize = Resize {
            name,
            cap_key: &cap_key,
            weight: weight.into(),
            create: token as i64,
            capacity,
            held_to: held_to_of(&cap),
        };
        match self
            .wait_turn(&queue, &key, ahead, room, rev + 1, deadline, Some(resize))
            .await
        {
            Ok(from) => {
                guard.disarm();
                let slot = guard.slot.take();
                let lost = self.hold(lease, key, Some(cap_key), None, token, from, slot);
                Ok(Grant { lease, token, lost })
            }
            Err(WaitEnd::Deleted) => {
                guard.disarm();
                Err(self.gone(name, &cap_key, etcd_lease).await)
            }
            Err(WaitEnd::TimedOut) => {
                // Give the withdrawal half a second: if etcd does not take it, it is not
                // a busy semaphore but an unreachable store.
                // (If it is cut short, the guard's drop retries it in the background.)
                let w = tokio::time::timeout(Duration::from_millis(500), guard.now()).await;
                match w {
                    Ok(Ok(())) => Err(Error::TimedOut),
                    _ => Err(self.etcd.unavailable()),
                }
            }
            Err(WaitEnd::Failed(e)) => {
                if matches!(e, Error::Rejected { .. }) {
                    // Refused (too heavy after a shrink): leave the queue before answering.
                    let _ = guard.now().await;
                }
                Err(e)
            }
        }
    }

    /// The error for an acquire whose key went away while it waited.
    pub(super) async fn gone(&self, name: &str, cap_key: &str, lease: i64) -> Error {
        match self.why_lost(Some(cap_key), lease).await {
            LostReason::Closed => closed(name),
            _ => Error::SessionLost,
        }
    }
}
