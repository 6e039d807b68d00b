//! What operators and `status` do: close, capacity changes, deletes, forced releases, the
//! status document, and ending another session.

use super::*;

impl Inner {
    pub(super) async fn close(&self, name: &str) -> Result<(), Error> {
        self.check_open()?;
        let cap_key = self.cap_key(name);
        loop {
            let (kv, _) = self.get(&cap_key).await?;
            let Some(kv) = kv else {
                return Err(no_such(name));
            };
            let mut value = kv.value.clone();
            value["closed"] = json!(true);
            let r = self
                .txn(txn(
                    vec![unchanged(&cap_key, kv.modr)],
                    vec![put(&cap_key, &value, 0), delete_prefix(&self.queue(name))],
                    vec![],
                ))
                .await?;
            if succeeded(&r) {
                return Ok(());
            }
        }
    }

    /// A semaphore's cap key and queue (in create order), read in one revision, that
    /// revision, and its capacity-change marker ([`bump_keys`]; none for a semaphore made
    /// before they were).
    pub(super) async fn read_semaphore(
        &self,
        name: &str,
    ) -> Result<(Kv, Vec<Kv>, i64, Option<Kv>), Error> {
        let cap_key = self.cap_key(name);
        let mut queue = range_prefix(&self.queue(name));
        queue["sort_target"] = json!("CREATE");
        queue["sort_order"] = json!("ASCEND");
        let reads = vec![
            json!({"request_range": range(&cap_key)}),
            json!({ "request_range": queue }),
            json!({"request_range": range_prefix(&format!("{cap_key}."))}),
        ];
        let r = self.txn(txn(vec![], reads, vec![])).await?;
        let Some(cap) = kvs(&txn_part(&r, 0)).into_iter().next() else {
            return Err(no_such(name));
        };
        let marker = kvs(&txn_part(&r, 2)).into_iter().next();
        Ok((cap, kvs(&txn_part(&r, 1)), header_rev(&r), marker))
    }

    /// Changes the capacity. The holder rule is a prefix sum over the capacity, so a shrink
    /// would turn holders past the new capacity into waiters: the cap key records, as
    /// `held_to`, the create revision of the last key holding when the capacity changed, and
    /// every key up to it keeps holding ([`holds`]). The txn requires the holders and the
    /// first waiter read still there (and, with no waiter, no key created since): else a
    /// release may have made one more holder under the old capacity, and the read is redone.
    /// Waiters watch its markers ([`bump_keys`]), so a grow grants them at once and a
    /// shrink below a waiter's weight fails its acquire.
    pub(super) async fn set_capacity(&self, name: &str, capacity: u32) -> Result<(), Error> {
        self.check_open()?;
        validate("semaphore name", name)?;
        if capacity == 0 {
            return Err(invalid("the capacity is zero".into()));
        }
        let (cap_key, queue_dir) = (self.cap_key(name), self.queue(name));
        let deadline = self.deadline();
        loop {
            let (cap, queue, rev, marker) = self.read_semaphore(name).await?;
            if is_closed(&cap.value) {
                return Err(closed(name));
            }
            let bumps = bump_keys(&cap_key);
            let Some(marker) = marker else {
                // Made before the markers: make one, for the change below to delete.
                let (a, b) = (&bumps[0], &bumps[1]);
                let make = txn(
                    vec![absent(a), absent(b)],
                    vec![put(a, &json!({}), 0)],
                    vec![],
                );
                self.txn(make).await?;
                continue;
            };
            let next = if marker.key == bumps[0] {
                &bumps[1]
            } else {
                &bumps[0]
            };
            let n = holder_count(&cap.value, &queue);
            let last_holder = n.checked_sub(1).map_or(0, |i| queue[i].create);
            let mut value = cap.value.clone();
            value["capacity"] = json!(capacity);
            value["held_to"] = json!(last_holder.max(held_to_of(&cap.value)));
            let mut compare = vec![
                unchanged(&cap_key, cap.modr),
                created_at(&marker.key, marker.create),
            ];
            compare.extend(
                queue
                    .iter()
                    .take(n + 1)
                    .map(|kv| created_at(&kv.key, kv.create)),
            );
            if n == queue.len() {
                compare.push(none_created_after(&queue_dir, rev));
            }
            let r = self
                .txn(txn(
                    compare,
                    vec![
                        put(&cap_key, &value, 0),
                        delete(&marker.key),
                        put(next, &json!({}), 0),
                    ],
                    vec![],
                ))
                .await?;
            if succeeded(&r) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.etcd.unavailable());
            }
        }
    }

    /// Deletes a closed or idle semaphore: its cap key and queue go in one txn that requires
    /// the cap key unchanged and (unless closed) the queue empty. Tokens stay increasing for
    /// the name: they are create revisions, and etcd's revision never goes back.
    pub(super) async fn delete(&self, name: &str) -> Result<(), Error> {
        self.check_open()?;
        validate("semaphore name", name)?;
        let (cap_key, queue_dir) = (self.cap_key(name), self.queue(name));
        let deadline = self.deadline();
        loop {
            let (cap, queue, _, _) = self.read_semaphore(name).await?;
            let closed = is_closed(&cap.value);
            if !closed && !queue.is_empty() {
                let holders = holder_count(&cap.value, &queue);
                let waiters = queue.len() - holders;
                return Err(Error::Rejected {
                    code: ErrorCode::InUse,
                    message: format!(
                        "semaphore {name:?} is in use ({holders} holders, {waiters} waiters): \
                         close it or wait until it is idle"
                    ),
                });
            }
            let mut compare = vec![unchanged(&cap_key, cap.modr)];
            if !closed {
                compare.push(empty_range(&queue_dir));
            }
            let r = self
                .txn(txn(
                    compare,
                    // The cap key and its markers ([`bump_keys`]).
                    vec![delete_prefix(&cap_key), delete_prefix(&queue_dir)],
                    vec![],
                ))
                .await?;
            if succeeded(&r) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.etcd.unavailable());
            }
        }
    }

    /// Releases a holder's lease by force: deletes its key and, in the same txn, writes
    /// `.../r/LEASE` bound to the holder's etcd lease, so that the holder's watch of its key
    /// (see [`Inner::hold`]) reports [`LostReason::Revoked`]. The waiters are granted
    /// through their own watches, as after a release.
    pub(super) async fn force_release(&self, name: &str, lease: u64) -> Result<(), Error> {
        self.check_open()?;
        validate("semaphore name", name)?;
        let unknown = || Error::Rejected {
            code: ErrorCode::UnknownLease,
            message: format!("lease {lease} does not hold semaphore {name:?}"),
        };
        let (cap, queue, _, _) = self.read_semaphore(name).await?;
        let n = holder_count(&cap.value, &queue);
        // A key that holds keeps holding until it is deleted, so "held at the read and
        // still the same key" means "holds now". The key is found by the lease id in its
        // value (its name is a slot, reused by its client's later acquires), and the txn
        // requires that incarnation of it (its create revision).
        let Some(kv) = queue[..n].iter().find(|kv| lease_id_of(kv) == lease) else {
            return Err(unknown());
        };
        let marker = put(&revoked_of(&kv.key, lease), &json!({}), kv.lease);
        match self
            .txn(txn(
                vec![created_at(&kv.key, kv.create)],
                vec![marker, delete(&kv.key)],
                vec![],
            ))
            .await
        {
            Ok(r) if succeeded(&r) => Ok(()),
            Ok(_) => Err(unknown()),
            // The holder's etcd lease ended just now, and its key with it.
            Err(Error::Protocol(m)) if m.contains("lease not found") => Err(unknown()),
            Err(e) => Err(e),
        }
    }

    /// A semaphore's status from its keys.
    pub(super) fn semaphore_status(
        name: String,
        cap: &Value,
        mut queue: Vec<Kv>,
    ) -> SemaphoreStatus {
        queue.sort_by_key(|kv| kv.create);
        let capacity = capacity_of(cap) as u32;
        let held_to = held_to_of(cap);
        let now = now_ms();
        let mut st = SemaphoreStatus {
            name,
            capacity,
            closed: cap.get("closed").and_then(Value::as_bool) == Some(true),
            ..SemaphoreStatus::default()
        };
        let mut before: u64 = 0;
        for kv in queue {
            let w = kv.value.get("w").and_then(Value::as_u64).unwrap_or(0);
            let lease_id = lease_id_of(&kv);
            let session = kv
                .value
                .get("s")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let client = kv
                .value
                .get("c")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let age_ms =
                now.saturating_sub(kv.value.get("t").and_then(Value::as_u64).unwrap_or(now));
            if holds(kv.create, before + w, u64::from(capacity), held_to) {
                st.in_use += w as u32;
                st.holders.push(HolderStatus {
                    lease_id,
                    session,
                    client,
                    weight: w as u32,
                    token: kv.create as u64,
                    age_ms,
                });
            } else {
                st.queued += 1;
                st.queued_weight += w;
                st.waiters.push(WaiterStatus {
                    lease_id,
                    session,
                    client,
                    weight: w as u32,
                    age_ms,
                });
            }
            before += w;
        }
        st
    }

    pub(super) async fn status(&self, name: Option<&str>) -> Result<StatusDoc, Error> {
        self.check_open()?;
        // One semaphore: its own keys. Otherwise (and for a job of that name) everything,
        // since a group's figures need its jobs' keys.
        let (mut all, _) = match name {
            Some(n) => self.list(&self.key(&format!("s/{}/", esc(n)))).await?,
            None => self.list(&self.key("")).await?,
        };
        if let Some(n) = name {
            if all.is_empty() {
                all = self.list(&self.key(&format!("j/{}/", esc(n)))).await?.0;
            }
        }
        let root = self.key("");
        let mut sems: HashMap<String, (Value, Vec<Kv>)> = HashMap::new();
        let mut jobs: HashMap<String, (Value, Vec<Kv>)> = HashMap::new();
        let mut groups: HashMap<String, Vec<String>> = HashMap::new();
        for kv in all {
            let Some(rest) = kv.key.strip_prefix(&root) else {
                continue;
            };
            let parts: Vec<&str> = rest.splitn(4, '/').collect();
            match parts.as_slice() {
                ["s", n, "cap"] => sems.entry(unesc(n)).or_default().0 = kv.value.clone(),
                ["s", n, "q", _] => sems.entry(unesc(n)).or_default().1.push(kv),
                ["j", n, "meta"] => jobs.entry(unesc(n)).or_default().0 = kv.value.clone(),
                ["j", n, "q", _] => jobs.entry(unesc(n)).or_default().1.push(kv),
                ["g", g, j] => groups.entry(unesc(g)).or_default().push(unesc(j)),
                _ => {}
            }
        }
        let mut doc = StatusDoc::default();
        for (n, (cap, queue)) in sems {
            if cap.is_null() {
                continue; // keys of a semaphore being deleted by hand
            }
            doc.semaphores.push(Self::semaphore_status(n, &cap, queue));
        }
        doc.semaphores.sort_by(|a, b| a.name.cmp(&b.name));
        let mut by_name = HashMap::new();
        for (n, (meta, queue)) in jobs {
            let st = job_status(n.clone(), &meta, queue);
            by_name.insert(n, st);
        }
        for (g, members) in groups {
            let mut gs = GroupStatus {
                name: g.clone(),
                ..GroupStatus::default()
            };
            for j in members {
                // A job moved to another group leaves its old marker until it is seen here.
                let Some(js) = by_name.get(&j) else { continue };
                if js.group.as_deref() != Some(g.as_str()) {
                    continue;
                }
                gs.jobs += 1;
                gs.completed += u32::from(js.completed.is_some());
                gs.running += u32::from(js.running.is_some());
                gs.failures += u64::from(js.failures);
            }
            doc.groups.push(gs);
        }
        doc.groups.sort_by(|a, b| a.name.cmp(&b.name));
        doc.jobs = by_name.into_values().collect();
        doc.jobs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(doc)
    }

    pub(super) async fn end_session(&self, session: u64) -> Result<(), Error> {
        self.check_open()?;
        let (keys, _) = self.list(&self.session_dir(session)).await?;
        if keys.is_empty() {
            return Ok(());
        }
        let deadline = self.deadline();
        // The markers outlive the revoked leases long enough for their owners to read them.
        let r = self
            .etcd
            .call("/v3/lease/grant", &json!({"TTL": "60"}), deadline)
            .await?;
        let marker = num(&r, "ID");
        for kv in keys {
            let body = json!({"key": b64(self.ended_key(kv.lease).as_bytes()), "value": b64(b"{}"), "lease": marker.to_string()});
            self.etcd.call("/v3/kv/put", &body, deadline).await?;
            self.revoke(kv.lease, deadline).await?;
        }
        Ok(())
    }
}
