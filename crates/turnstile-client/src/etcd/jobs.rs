//! Run-once jobs and groups on etcd: a job's lock is a capacity-1 queue under `j/JOB/`, its
//! completion recorded in its metadata by the holder's txn.

use super::*;

/// A job's metadata (`j/JOB/meta`).
pub(super) fn job_status(name: String, meta: &Value, mut queue: Vec<Kv>) -> JobStatus {
    queue.sort_by_key(|kv| kv.create);
    let now = now_ms();
    let done = meta.get("done").filter(|d| !d.is_null());
    JobStatus {
        name,
        group: meta.get("group").and_then(Value::as_str).map(str::to_owned),
        completed: done.map(|d| CompletionStatus {
            client: d
                .get("client")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            token: d.get("token").and_then(Value::as_u64).unwrap_or(0),
            started_unix_ms: d.get("started_ms").and_then(Value::as_u64).unwrap_or(0),
            duration_ms: d.get("duration_ms").and_then(Value::as_u64).unwrap_or(0),
        }),
        running: queue.first().map(|kv| RunningStatus {
            client: kv
                .value
                .get("c")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            session: kv
                .value
                .get("s")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            token: kv.create as u64,
            age_ms: now.saturating_sub(kv.value.get("t").and_then(Value::as_u64).unwrap_or(now)),
        }),
        waiting: queue.len().saturating_sub(1) as u64,
        failures: meta.get("failures").and_then(Value::as_u64).unwrap_or(0) as u32,
        last_failure: meta
            .get("last_failure")
            .and_then(Value::as_str)
            .map(str::to_owned),
    }
}

pub(super) fn completion_of(done: &Value) -> JobCompletion {
    JobCompletion {
        client: done
            .get("client")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        token: done.get("token").and_then(Value::as_u64).unwrap_or(0),
        started: UNIX_EPOCH
            + Duration::from_millis(done.get("started_ms").and_then(Value::as_u64).unwrap_or(0)),
        duration: Duration::from_millis(
            done.get("duration_ms").and_then(Value::as_u64).unwrap_or(0),
        ),
    }
}

pub(super) fn done_of(meta: &Value) -> Option<&Value> {
    meta.get("done").filter(|d| !d.is_null())
}

impl Inner {
    /// Puts `job` in `group` (a compare-and-swap on its metadata).
    pub(super) async fn set_group(&self, job: &str, group: &str) -> Result<(), Error> {
        let meta_key = self.meta_key(job);
        loop {
            let (kv, _) = self.get(&meta_key).await?;
            let (mut meta, modr) = kv.map_or((json!({}), 0), |kv| (kv.value, kv.modr));
            let old = meta.get("group").and_then(Value::as_str).map(str::to_owned);
            if old.as_deref() == Some(group) {
                return Ok(());
            }
            meta["group"] = json!(group);
            let marker = self.key(&format!("g/{}/{}", esc(group), esc(job)));
            let mut ops = vec![put(&meta_key, &meta, 0), put(&marker, &json!({}), 0)];
            if let Some(old) = old {
                ops.push(delete(&self.key(&format!("g/{}/{}", esc(&old), esc(job)))));
            }
            let cmp = if modr == 0 {
                absent(&meta_key)
            } else {
                unchanged(&meta_key, modr)
            };
            if succeeded(&self.txn(txn(vec![cmp], ops, vec![])).await?) {
                return Ok(());
            }
        }
    }

    pub(super) async fn begin_job(
        self: Arc<Self>,
        job: &str,
        group: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<JobBegin, Error> {
        self.check_open()?;
        validate("job name", job)?;
        if let Some(g) = group {
            validate("group name", g)?;
            self.set_group(job, g).await?;
        }
        let meta_key = self.meta_key(job);
        let queue = self.job_queue(job);
        let lease = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let key = format!("{queue}{lease:016x}");
        let record =
            json!({"w": 1, "s": format!("{:016x}", self.session), "c": self.client, "t": now_ms()});
        let mut guard = Withdraw {
            inner: self.clone(),
            key: Some(key.clone()),
            slot: None,
        };
        let deadline = timeout.map(|t| Instant::now() + t);
        let (r, _) = self
            .create_txn(deadline, |lease| {
                txn(
                    vec![absent(&key), absent(&tomb_of(&key))],
                    vec![
                        put(&key, &record, lease),
                        json!({"request_range": range(&meta_key)}),
                    ],
                    vec![json!({"request_range": range(&meta_key)})],
                )
            })
            .await?;
        let meta = kvs(&txn_part(&r, if succeeded(&r) { 1 } else { 0 }))
            .into_iter()
            .next()
            .map(|kv| kv.value);
        if let Some(done) = meta.as_ref().and_then(done_of) {
            let _ = guard.now().await;
            return Ok(JobBegin::Completed(completion_of(done)));
        }
        let (queued, rev) = self.list(&queue).await?;
        let Some(me) = queued.iter().find(|kv| kv.key == key) else {
            guard.disarm();
            return Err(Error::SessionLost);
        };
        let ahead: HashMap<String, (u64, i64)> = queued
            .iter()
            .filter(|kv| kv.create < me.create)
            .map(|kv| (kv.key.clone(), (1, kv.create)))
            .collect();
        let token = me.create as u64;
        if timeout == Some(Duration::ZERO) {
            if let Some(head) = queued.first().filter(|h| h.key != key) {
                let _ = guard.now().await;
                let t = head.value.get("t").and_then(Value::as_u64).unwrap_or(0);
                return Ok(JobBegin::Running(JobRunner {
                    client: head
                        .value
                        .get("c")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    token: head.create as u64,
                    running_for: Duration::from_millis(now_ms().saturating_sub(t)),
                }));
            }
        }
        let from = match self
            .wait_turn(&queue, &key, ahead, 0, rev + 1, deadline, None)
            .await
        {
            Ok(from) => from,
            Err(WaitEnd::Deleted) => {
                guard.disarm();
                return Err(Error::SessionLost);
            }
            Err(WaitEnd::TimedOut) => {
                let _ = guard.now().await;
                return Err(Error::TimedOut);
            }
            Err(WaitEnd::Failed(e)) => return Err(e),
        };
        // First in line: the job is ours unless the attempt before completed it. An attempt
        // that started and never recorded its end (it died) counts as a failure.
        loop {
            let (kv, _) = self.get(&meta_key).await?;
            let (mut meta, modr) = kv.map_or((json!({}), 0), |kv| (kv.value, kv.modr));
            if let Some(done) = done_of(&meta) {
                let c = completion_of(done);
                let _ = guard.now().await;
                return Ok(JobBegin::Completed(c));
            }
            if meta.get("running").is_some_and(|r| !r.is_null()) {
                let f = meta.get("failures").and_then(Value::as_u64).unwrap_or(0);
                meta["failures"] = json!(f + 1);
                meta["last_failure"] = json!("the runner's session ended");
            }
            meta["running"] = json!(token);
            let cmp = if modr == 0 {
                absent(&meta_key)
            } else {
                unchanged(&meta_key, modr)
            };
            let r = self
                .txn(txn(
                    vec![exists(&key), cmp],
                    vec![put(&meta_key, &meta, 0)],
                    vec![json!({"request_range": range(&key)})],
                ))
                .await?;
            if succeeded(&r) {
                break;
            }
            if kvs(&txn_part(&r, 0)).is_empty() {
                guard.disarm();
                return Err(Error::SessionLost);
            }
        }
        guard.disarm();
        let lost = self.hold(lease, key, None, Some(job.to_owned()), token, from, None);
        Ok(JobBegin::Run(Grant { lease, token, lost }))
    }

    /// Records how an attempt ended and deletes its key, in one txn that requires the key to
    /// still exist: only the current holder records anything.
    pub(super) async fn record_end(
        &self,
        job: &str,
        h: &Held,
        end: JobEnd<'_>,
    ) -> Result<(), Error> {
        let meta_key = self.meta_key(job);
        loop {
            let (kv, _) = self.get(&meta_key).await?;
            let (mut meta, modr) = kv.map_or((json!({}), 0), |kv| (kv.value, kv.modr));
            match end {
                JobEnd::Succeeded { started, duration } => {
                    let started_ms = started
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    meta["done"] = json!({"client": self.client, "token": h.token,
                        "started_ms": started_ms, "duration_ms": duration.as_millis() as u64});
                    // As on the other backends, a completion clears the last failure's
                    // reason (the count stays until a reset).
                    meta["last_failure"] = Value::Null;
                }
                JobEnd::Failed { reason } => {
                    let f = meta.get("failures").and_then(Value::as_u64).unwrap_or(0);
                    meta["failures"] = json!(f + 1);
                    meta["last_failure"] = json!(reason);
                }
            }
            meta["running"] = Value::Null;
            let cmp = if modr == 0 {
                absent(&meta_key)
            } else {
                unchanged(&meta_key, modr)
            };
            let r = self
                .txn(txn(
                    vec![exists(&h.key), cmp],
                    vec![put(&meta_key, &meta, 0), delete(&h.key)],
                    vec![json!({"request_range": range(&h.key)})],
                ))
                .await?;
            if succeeded(&r) {
                return Ok(());
            }
            if kvs(&txn_part(&r, 0)).is_empty() {
                let reason = self.why_lost(None, self.lease.load(Ordering::SeqCst)).await;
                return Err(Error::LeaseLost(reason));
            }
        }
    }

    pub(super) async fn finish_job(
        &self,
        job: &str,
        lease: u64,
        end: JobEnd<'_>,
    ) -> Result<(), Error> {
        self.check_open()?;
        let Some(h) = self.take(lease) else {
            return Err(Error::Rejected {
                code: ErrorCode::UnknownLease,
                message: format!("lease {lease} of job {job:?} is not held"),
            });
        };
        self.record_end(job, &h, end).await
    }

    pub(super) async fn reset_job(&self, job: &str) -> Result<bool, Error> {
        self.check_open()?;
        validate("job name", job)?;
        let meta_key = self.meta_key(job);
        loop {
            let (Some(kv), _) = self.get(&meta_key).await? else {
                return Ok(false);
            };
            let mut meta = kv.value;
            let had = done_of(&meta).is_some();
            meta["done"] = Value::Null;
            meta["failures"] = json!(0);
            meta["last_failure"] = Value::Null;
            let r = self
                .txn(txn(
                    vec![unchanged(&meta_key, kv.modr)],
                    vec![put(&meta_key, &meta, 0)],
                    vec![],
                ))
                .await?;
            if succeeded(&r) {
                return Ok(had);
            }
        }
    }

    pub(super) async fn group_summary(&self, group: &str) -> Result<(GroupSummary, i64), Error> {
        let (markers, rev) = self.list(&self.key(&format!("g/{}/", esc(group)))).await?;
        let mut s = GroupSummary::default();
        for m in markers {
            let Some(job) = m.key.rsplit('/').next().map(unesc) else {
                continue;
            };
            let (kvs, _) = self.list(&self.key(&format!("j/{}/", esc(&job)))).await?;
            let meta_key = self.meta_key(&job);
            let meta = kvs
                .iter()
                .find(|kv| kv.key == meta_key)
                .map(|kv| kv.value.clone())
                .unwrap_or(Value::Null);
            if meta.get("group").and_then(Value::as_str) != Some(group) {
                continue;
            }
            let attempts = self.job_queue(&job);
            let queue: Vec<Kv> = kvs
                .into_iter()
                .filter(|kv| kv.key.starts_with(&attempts))
                .collect();
            let st = job_status(job, &meta, queue);
            s.jobs += 1;
            s.completed += u32::from(st.completed.is_some());
            s.running += u32::from(st.running.is_some());
            s.failures += u64::from(st.failures);
        }
        Ok((s, rev))
    }

    pub(super) async fn wait_group(
        &self,
        group: &str,
        jobs: u32,
        timeout: Option<Duration>,
    ) -> Result<GroupSummary, Error> {
        self.check_open()?;
        validate("group name", group)?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let (s, rev) = self.group_summary(group).await?;
            if s.running == 0 && s.completed >= jobs {
                return Ok(s);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::TimedOut);
            }
            // Any change to a job or group may settle the group: wait for one, then look again.
            let mut stream = match self
                .open_watch(&self.key(""), true, rev + 1, false, deadline)
                .await
            {
                Ok(s) => s,
                Err(WaitEnd::TimedOut) => return Err(Error::TimedOut),
                Err(WaitEnd::Failed(e)) => return Err(e),
                Err(WaitEnd::Deleted) => continue,
            };
            loop {
                let quiet = Instant::now() + WATCH_QUIET;
                let until = deadline.map_or(quiet, |d| d.min(quiet));
                match tokio::time::timeout_at(until, stream.next()).await {
                    Ok(Ok(m)) if m.get("events").is_some() => break,
                    // A compacted start revision: read the group again.
                    Ok(Ok(m)) if num(&m, "compact_revision") > 0 => break,
                    Ok(Ok(_)) => continue,
                    _ => break,
                }
            }
        }
    }
}
