//! The etcd backend (`etcd://HOST:PORT,HOST2:PORT[/PREFIX]`): semaphores and run-once jobs
//! kept in an etcd cluster, with no turnstile server. It speaks etcd's gRPC API (protobuf
//! over HTTP/2, one connection per member) through [`grpc`], building and reading every
//! request and answer in the JSON shapes of etcd's gRPC JSON gateway (`/v3/kv/txn`...),
//! which [`pb`] translates to and from protobuf.
//!
//! # Layout (under `PREFIX/`, default `turnstile/`; names escaped so they hold no `/`)
//! - `s/NAME/cap`: `{"capacity":N,"closed":bool,"held_to":REV}`, created once by a
//!   create-if-absent txn, changed by close and set-capacity, deleted by delete. `held_to`
//!   (absent: 0) is the create revision of the last key that held when the capacity last
//!   changed: see [`Inner::set_capacity`].
//! - `s/NAME/cap.a` or `s/NAME/cap.b` (one of them): a capacity change deletes the one there
//!   and creates the other, so that waiters, which watch deletions only, hear of it.
//! - `s/NAME/q/ETCDLEASE.N`: an acquire's key, bound to the client's etcd lease `ETCDLEASE`
//!   (hex), named by one of the client's slots `N` ([`Slot`]): a slot is taken by an acquire
//!   and given back once its key is gone, so a client reuses its key names and the names
//!   under a queue stay as few as the acquires ever in flight at once. (etcd keeps a deleted
//!   key's name in its index until a compaction, and every range over the queue walks them:
//!   one name per acquire made each acquire slower than the last.) The value holds the
//!   turnstile lease id (`l`), the weight, session and client. Its create revision orders the
//!   queue and is the fencing token: strictly increasing per semaphore, also for a reused
//!   name (a re-created key gets a new create revision), but not dense (every write anywhere
//!   in the cluster takes a revision).
//! - `s/NAME/x/ETCDLEASE.N`: the slot's tombstone, bound to the same etcd lease, `{"l":
//!   LEASE}` of the last acquire that created the key. The create txn writes it and requires
//!   its mod revision unchanged since the client last saw it, so a create txn applies at
//!   most once: a copy that etcd applies late (sent to a member that hung, then retried on
//!   another), even after the grant was released and the name reused, creates nothing, and
//!   a retry whose first attempt was applied finds its own lease id here. A withdrawn
//!   acquire (dropped or timed out) writes it too, in the txn that deletes the key.
//! - `s/NAME/r/LEASE`: a lease released by force (`revoke`, which finds the key by the lease
//!   id in its value), written in the txn that deletes its key and bound to the holder's
//!   etcd lease; its holder reports [`LostReason::Revoked`].
//! - `j/JOB/meta` (group, completion, failures, the running token) and `j/JOB/q/LEASE` (the
//!   attempts: a capacity-1 queue, one key name per attempt; `j/JOB/x/LEASE` the tombstone of
//!   a withdrawn one, required absent by the create); `g/GROUP/JOB` lists a group's jobs.
//! - `c/SESSION/ETCDLEASE`: which etcd leases carry a session (several clients may share one);
//!   `e/ETCDLEASE`: written by `end_session` before it revokes a lease, so that its owner can
//!   tell "ended by a supervisor" from "expired".
//!
//! # Waiting
//! A key holds when the weights of all keys created before it plus its own fit the capacity,
//! or when it was created at or before the cap key's `held_to` (it held when the capacity
//! shrank, and keeps holding). Keys ahead of a waiter can only go away, so the waiter reads
//! the queue once, keeps the keys ahead of it, and watches deletions under the queue from
//! that revision: it does not re-read the store on events about keys behind it, and it is
//! granted without any further request when the last key in its way goes. A semaphore's
//! waiter's watch (`NOPUT`) also covers the cap key's change markers: on the deletion of one
//! it re-reads the capacity; a grow grants it, a shrink below its weight fails it. A watch
//! silent for [`WATCH_QUIET`] is re-opened (on the endpoint in use then), so a member that
//! hangs does not hold a waiter.
//! If etcd compacted the revision a watch starts from (it cancels the watch with
//! `compact_revision`), the deletions in between cannot be replayed: the waiter reads the
//! queue again (keys ahead only go away, so the ones left are still in its way) and the
//! holder its own key, and each watches on from that read.
//!
//! # Sessions and deadlines
//! Each client grants its own etcd lease (TTL = the session TTL, at least etcd's minimum of
//! 2 s) and keeps it alive at a third of the TTL. When no keep-alive has been acknowledged
//! for 90% of the TTL the client treats its leases as lost ([`LostReason::Unreachable`]);
//! when etcd says the lease is gone they are lost as expired (or ended). Every request has a
//! deadline, fails over between the endpoints, and ends in [`Error::Unavailable`] when no
//! member answers in time.

mod acquire;
mod admin;
pub(crate) mod grpc;
mod jobs;
mod keys;
pub(crate) mod pb;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::lost::LostSender;
use serde_json::{json, Value};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use turnstile_proto::{
    CompletionStatus, ErrorCode, GroupStatus, HolderStatus, JobStatus, RunningStatus,
    SemaphoreStatus, StatusDoc, WaiterStatus,
};

use self::grpc::Stream;
use self::jobs::job_status;
use self::keys::*;
use self::pb::{b64, unb64};
use crate::backend::{BoxFuture, Grant, JobBegin, JobEnd};
use crate::{Backend, Error, GroupSummary, JobCompletion, JobRunner, LostReason, Options};

/// The session TTL when none is asked for (as on the other backends).
const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// etcd's smallest lease TTL with its default election timeout (1 s): ceil(1.5 s).
const MIN_TTL: Duration = Duration::from_secs(2);
/// The longest one request to one member may take before the next member is tried.
const ATTEMPT: Duration = Duration::from_secs(2);
/// A watch that has said nothing for this long is re-opened (it may sit on a hung member).
const WATCH_QUIET: Duration = Duration::from_secs(3);
/// How long after a grant its holder starts watching its key (for a close, or the end of
/// its lease noticed by another client): see [`Inner::hold`]. The watches are started by
/// [`Inner::start_watches`], which looks every half of this, so a watch starts between one
/// and one and a half of it after its grant.
const HOLDER_WATCH_DELAY: Duration = Duration::from_millis(200);
/// How long [`Inner::start_watches`] goes on looking with no grant held before it sleeps
/// until the next grant.
const WATCH_STARTER_IDLE: Duration = Duration::from_secs(5);
/// How many semaphores a client keeps slots and a cached capacity for before it forgets the
/// idle ones (see [`Inner::free_slot`]).
const MAX_CACHED_SEMAPHORES: usize = 1024;
/// The longest name, as on the coordinator.
const MAX_NAME_LEN: usize = 255;

/// An `etcd://` URL, parsed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct EtcdUrl {
    /// `host:port` of each member.
    pub(crate) endpoints: Vec<String>,
    /// The key prefix, without its trailing `/`.
    pub(crate) prefix: String,
}

/// Parses what follows `etcd://`: `HOST:PORT[,HOST:PORT...][/PREFIX]`.
pub(crate) fn parse_url(rest: &str) -> Result<EtcdUrl, String> {
    let (hosts, prefix) = match rest.split_once('/') {
        Some((h, p)) => (h, p.trim_matches('/')),
        None => (rest, ""),
    };
    let mut endpoints = Vec::new();
    for h in hosts.split(',').filter(|h| !h.is_empty()) {
        let Some((host, port)) = h.rsplit_once(':') else {
            return Err(format!("endpoint {h:?} has no port: expected HOST:PORT"));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("endpoint {h:?} is not HOST:PORT"));
        }
        endpoints.push(h.to_owned());
    }
    if endpoints.is_empty() {
        return Err("expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX]".into());
    }
    if prefix.chars().any(char::is_control) {
        return Err("the prefix contains a control character".into());
    }
    Ok(EtcdUrl {
        endpoints,
        prefix: if prefix.is_empty() {
            "turnstile".into()
        } else {
            prefix.into()
        },
    })
}

/// The members and which one is in use.
struct Etcd {
    endpoints: Vec<String>,
    current: AtomicUsize,
    label: String,
    last_ok: Mutex<Instant>,
    /// Kept-alive connections for unary requests.
    pool: grpc::Pool,
}

impl Etcd {
    fn silent_for(&self) -> Duration {
        self.last_ok.lock().map(|t| t.elapsed()).unwrap_or_default()
    }

    fn unavailable(&self) -> Error {
        Error::Unavailable {
            addr: self.label.clone(),
            silent_for: self.silent_for(),
        }
    }

    fn endpoint(&self) -> (usize, &str) {
        let i = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        (i, &self.endpoints[i])
    }

    /// Moves on from endpoint `i` (unless another request already did).
    fn fail_over(&self, i: usize) {
        self.pool.forget(&self.endpoints[i]);
        let _ = self.current.compare_exchange(
            i,
            (i + 1) % self.endpoints.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// One request, tried on the members in turn until `deadline`.
    async fn call(&self, path: &str, body: &Value, deadline: Instant) -> Result<Value, Error> {
        let mut tries = 0usize;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.unavailable());
            }
            let (i, addr) = self.endpoint();
            let attempt = ATTEMPT.min(deadline - now);
            match tokio::time::timeout(attempt, self.pool.post(addr, path, body)).await {
                Ok(Ok(v)) => {
                    if let Ok(mut t) = self.last_ok.lock() {
                        *t = Instant::now();
                    }
                    return Ok(v);
                }
                Ok(Err(f)) if !f.retryable() => {
                    if let Ok(mut t) = self.last_ok.lock() {
                        *t = Instant::now();
                    }
                    let message = f.message();
                    return Err(Error::Protocol(format!("etcd at {addr}: {message}")));
                }
                Ok(Err(f)) => {
                    tracing::debug!(addr, ?f, "etcd request failed; trying the next member")
                }
                Err(_) => tracing::debug!(addr, "etcd request timed out; trying the next member"),
            }
            self.fail_over(i);
            tries += 1;
            if tries == self.endpoints.len() {
                // Every member failed once: pause before the next round.
                tries = 0;
                let pause = Duration::from_millis(100)
                    .min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// A lease this client holds.
struct Held {
    key: String,
    /// The job, for a job's attempt.
    job: Option<String>,
    token: u64,
    lost: LostSender,
    watcher: Option<AbortHandle>,
    /// The watch of the key, not started yet: see [`Inner::hold`].
    pending: Option<PendingWatch>,
    /// A semaphore grant's key name, free for the next acquire once the key is gone.
    slot: Option<Slot>,
}

/// A holder's watch of its key, to be started [`HOLDER_WATCH_DELAY`] after the grant.
struct PendingWatch {
    /// The semaphore's cap key (none for a job).
    cap: Option<String>,
    /// The revision to watch from (the grant's).
    from: i64,
    /// The etcd lease the key is bound to.
    etcd_lease: i64,
    /// When the grant was made.
    granted: Instant,
}

/// One of this client's key names in a semaphore's queue: `s/NAME/q/ETCDLEASE.N`, with its
/// tombstone `s/NAME/x/ETCDLEASE.N`. An acquire takes a free slot and gives it back once its
/// key is gone, so the names under a queue are bounded by how many acquires each client
/// had in flight at once, not by how many were ever made: etcd keeps every deleted key's
/// name in its index until a compaction, and a range over the queue (the acquire's count)
/// walks all of them.
#[derive(Clone, Debug)]
struct Slot {
    /// The semaphore.
    name: String,
    n: u32,
    /// The etcd lease the slot's keys are bound to (part of their names).
    etcd_lease: i64,
    /// The mod revision of the slot's tombstone as this client last wrote or read it (0:
    /// none). Every create of the slot's key writes the tombstone in the same txn and
    /// requires this mod revision, so each create txn can apply at most once: a retried
    /// (or late) copy of one finds the tombstone moved on and creates nothing.
    fence: i64,
}

/// A client that goes through many semaphore names forgets the idle ones (every slot back)
/// beyond [`MAX_CACHED_SEMAPHORES`], except `keep`: a name's next acquire then finds its
/// slot's tombstone moved on, reads it and retries. A semaphore with an acquire in flight
/// is kept, so that a slot in use is never handed out twice.
fn trim(sems: &mut HashMap<String, SemCache>, keep: &str) {
    if sems.len() > MAX_CACHED_SEMAPHORES {
        sems.retain(|name, sem| name == keep || sem.free.len() < sem.next as usize);
    }
}

/// What a client keeps about a semaphore between its acquires.
#[derive(Default)]
struct SemCache {
    /// The cap key's value and mod revision, as last written or read: an acquire compares
    /// the mod revision instead of reading the key.
    cap: Option<(Value, i64)>,
    /// Slots whose keys are gone, for the next acquires.
    free: Vec<Slot>,
    /// The lowest slot number never taken.
    next: u32,
}

struct Inner {
    etcd: Etcd,
    prefix: String,
    session: u64,
    client: String,
    ttl: Duration,
    /// The etcd lease that carries this client's keys.
    lease: AtomicI64,
    next_lease: AtomicU64,
    grants: Mutex<HashMap<u64, Held>>,
    /// Per semaphore: its cached capacity and this client's key names ([`Slot`]).
    sems: Mutex<HashMap<String, SemCache>>,
    shut: AtomicBool,
    last_ack: Mutex<Instant>,
    /// Set by [`Inner::start_watches`] when it sleeps until the next grant.
    starter_idle: AtomicBool,
    /// Wakes [`Inner::start_watches`] from that sleep.
    starter_wake: tokio::sync::Notify,
}

/// The etcd backend.
pub(crate) struct EtcdBackend {
    inner: Arc<Inner>,
    keepalive: JoinHandle<()>,
    watch_starter: JoinHandle<()>,
}

/// Withdraws a queued key if the acquire that made it is dropped or gives up. A withdrawal
/// writes the key's tombstone (`.../x/...`, bound to the client's lease) in the same txn that
/// deletes the key, and the create txn requires the tombstone absent (a job's attempt) or at
/// the mod revision it had before (a semaphore's slot): so a create that etcd applies only
/// after the withdrawal (it was in flight when the acquire was dropped) creates nothing,
/// instead of leaving a key that would hold its place while the client lives. A semaphore's
/// slot is given back once the withdrawal is done.
struct Withdraw {
    inner: Arc<Inner>,
    key: Option<String>,
    slot: Option<Slot>,
}

impl Withdraw {
    /// The key is known gone (or made a grant, which takes the slot): nothing to withdraw.
    fn disarm(&mut self) {
        self.key = None;
    }

    /// Withdraws now; if etcd cannot be reached, the drop retries in the background.
    async fn now(&mut self) -> Result<(), Error> {
        if let Some(key) = self.key.clone() {
            let rev = self.inner.withdraw(&key, self.slot.as_ref()).await?;
            if let Some(slot) = self.slot.as_mut() {
                slot.fence = rev;
            }
            self.key = None;
        }
        Ok(())
    }
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        let slot = self.slot.take();
        match self.key.take() {
            Some(key) => {
                let inner = self.inner.clone();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if let Ok(rev) = inner.withdraw(&key, slot.as_ref()).await {
                            if let Some(mut slot) = slot {
                                slot.fence = rev;
                                inner.free_slot(slot);
                            }
                        }
                    });
                }
            }
            None => {
                if let Some(slot) = slot {
                    self.inner.free_slot(slot);
                }
            }
        }
    }
}

/// How a wait in a queue ended, other than by a grant.
enum WaitEnd {
    /// Our own key went away (closed, or our lease ended).
    Deleted,
    /// The deadline passed.
    TimedOut,
    /// A request failed.
    Failed(Error),
}

impl Inner {
    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    fn cap_key(&self, name: &str) -> String {
        self.key(&format!("s/{}/cap", esc(name)))
    }

    fn queue(&self, name: &str) -> String {
        self.key(&format!("s/{}/q/", esc(name)))
    }

    fn meta_key(&self, job: &str) -> String {
        self.key(&format!("j/{}/meta", esc(job)))
    }

    fn job_queue(&self, job: &str) -> String {
        self.key(&format!("j/{}/q/", esc(job)))
    }

    fn session_dir(&self, session: u64) -> String {
        self.key(&format!("c/{session:016x}/"))
    }

    fn ended_key(&self, lease: i64) -> String {
        self.key(&format!("e/{lease:016x}"))
    }

    /// The deadline of a call that does not wait: one session TTL.
    fn deadline(&self) -> Instant {
        Instant::now() + self.ttl
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.shut.load(Ordering::SeqCst) {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }

    async fn call(&self, path: &str, body: &Value) -> Result<Value, Error> {
        self.etcd.call(path, body, self.deadline()).await
    }

    async fn txn(&self, body: Value) -> Result<Value, Error> {
        self.call("/v3/kv/txn", &body).await
    }

    async fn get(&self, key: &str) -> Result<(Option<Kv>, i64), Error> {
        let r = self.call("/v3/kv/range", &range(key)).await?;
        Ok((kvs(&r).into_iter().next(), header_rev(&r)))
    }

    /// Everything under `prefix` in create order, and the revision read at.
    async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), Error> {
        self.list_until(prefix, self.deadline()).await
    }

    /// [`Inner::list`], failing over until `deadline`.
    async fn list_until(&self, prefix: &str, deadline: Instant) -> Result<(Vec<Kv>, i64), Error> {
        let mut body = range_prefix(prefix);
        body["sort_target"] = json!("CREATE");
        body["sort_order"] = json!("ASCEND");
        let r = self.etcd.call("/v3/kv/range", &body, deadline).await?;
        Ok((kvs(&r), header_rev(&r)))
    }

    /// Runs the txn that creates a queue key bound to the client's etcd lease (`build` makes
    /// it for a lease id); returns its answer and the lease used. If etcd no longer knows the
    /// lease (it expired while etcd was out of reach, or the keep-alive is replacing it after
    /// such a spell), waits for the keep-alive's new lease and tries again, rather than
    /// failing every acquire made meanwhile.
    async fn create_txn(
        &self,
        deadline: Option<Instant>,
        build: impl Fn(i64) -> Value,
    ) -> Result<(Value, i64), Error> {
        loop {
            let lease = self.lease.load(Ordering::SeqCst);
            match self.txn(build(lease)).await {
                Err(Error::Protocol(m)) if m.contains("lease not found") => {
                    self.await_new_lease(lease, deadline).await?;
                }
                other => return other.map(|r| (r, lease)),
            }
        }
    }

    /// Deletes a queued key and leaves its tombstone (see [`Withdraw`]); returns the txn's
    /// revision (the tombstone's new mod revision). A slot's tombstone is bound to the etcd
    /// lease of its key; if that lease is gone, so is the key.
    async fn withdraw(&self, key: &str, slot: Option<&Slot>) -> Result<i64, Error> {
        let lease = match slot {
            Some(s) => s.etcd_lease,
            None => self.lease.load(Ordering::SeqCst),
        };
        match self
            .txn(txn(
                vec![],
                vec![put(&tomb_of(key), &json!({}), lease), delete(key)],
                vec![],
            ))
            .await
        {
            Ok(r) => Ok(header_rev(&r)),
            Err(Error::Protocol(m)) if slot.is_some() && m.contains("lease not found") => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// This client's cache of its semaphores. (Nothing panics while holding it; a poisoned
    /// lock would still hold consistent data, since every change is one assignment.)
    fn sems(&self) -> std::sync::MutexGuard<'_, HashMap<String, SemCache>> {
        self.sems
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a free slot of semaphore `name` (or a new one) for an acquire.
    fn take_slot(&self, name: &str) -> Slot {
        let free = self.sems().get_mut(name).and_then(|s| s.free.pop());
        free.unwrap_or_else(|| self.new_slot(name))
    }

    /// A slot of semaphore `name` never taken before.
    fn new_slot(&self, name: &str) -> Slot {
        let mut sems = self.sems();
        let sem = sems.entry(name.to_owned()).or_default();
        let n = sem.next;
        sem.next += 1;
        Slot {
            name: name.to_owned(),
            n,
            etcd_lease: 0,
            fence: 0,
        }
    }

    /// Gives back a slot whose key is gone, with its tombstone's mod revision.
    fn free_slot(&self, slot: Slot) {
        let mut sems = self.sems();
        trim(&mut sems, &slot.name);
        sems.entry(slot.name.clone()).or_default().free.push(slot);
    }

    fn cached_cap(&self, name: &str) -> Option<(Value, i64)> {
        self.sems().get(name)?.cap.clone()
    }

    fn cache_cap(&self, name: &str, cap: Option<(Value, i64)>) {
        let mut sems = self.sems();
        trim(&mut sems, name);
        sems.entry(name.to_owned()).or_default().cap = cap;
    }

    /// Waits until the keep-alive replaced etcd lease `lease` (etcd said it does not know
    /// it): by the acquire's `deadline`, else one TTL.
    async fn await_new_lease(&self, lease: i64, deadline: Option<Instant>) -> Result<(), Error> {
        let give_up = self.deadline();
        while self.lease.load(Ordering::SeqCst) == lease {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::TimedOut);
            }
            if now >= give_up {
                return Err(self.etcd.unavailable());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Grants a fresh etcd lease and records it under the session.
    async fn new_lease(&self, deadline: Instant) -> Result<i64, Error> {
        let secs = self.ttl.as_secs().max(1);
        let r = self
            .etcd
            .call(
                "/v3/lease/grant",
                &json!({"TTL": secs.to_string()}),
                deadline,
            )
            .await?;
        let lease = num(&r, "ID");
        if lease == 0 {
            return Err(Error::Protocol(format!("etcd granted no lease: {r}")));
        }
        let key = format!("{}{lease:016x}", self.session_dir(self.session));
        let body = json!({"key": b64(key.as_bytes()), "value": b64(json!({"client": self.client}).to_string().as_bytes()), "lease": lease.to_string()});
        self.etcd.call("/v3/kv/put", &body, deadline).await?;
        self.lease.store(lease, Ordering::SeqCst);
        Ok(lease)
    }

    async fn revoke(&self, lease: i64, deadline: Instant) -> Result<(), Error> {
        match self
            .etcd
            .call(
                "/v3/lease/revoke",
                &json!({"ID": lease.to_string()}),
                deadline,
            )
            .await
        {
            Err(Error::Protocol(m)) if m.contains("not found") => Ok(()),
            other => other.map(drop),
        }
    }

    /// Why a key of ours (bound to `lease`) went away.
    async fn why_lost(&self, cap: Option<&str>, lease: i64) -> LostReason {
        if let Some(cap) = cap {
            if let Ok((Some(kv), _)) = self.get(cap).await {
                if kv.value.get("closed").and_then(Value::as_bool) == Some(true) {
                    return LostReason::Closed;
                }
            }
        }
        match self.get(&self.ended_key(lease)).await {
            Ok((Some(_), _)) => LostReason::SessionEnded,
            _ => LostReason::Expired,
        }
    }

    fn lose(&self, lease: u64, reason: LostReason) {
        let held = self.grants.lock().ok().and_then(|mut g| g.remove(&lease));
        if let Some(h) = held {
            h.lost.send(reason);
            if let Some(w) = h.watcher {
                w.abort();
            }
            // Every other reason was seen as the key's deletion or its etcd lease's end; an
            // unreachable store may still have the key, so its name is not reused (the etcd
            // lease is replaced after such a spell, and the names with it).
            if let Some(slot) = h.slot.filter(|_| reason != LostReason::Unreachable) {
                self.free_slot(slot);
            }
        }
    }

    fn lose_all(&self, reason: LostReason) {
        let all: Vec<u64> = self
            .grants
            .lock()
            .map(|g| g.keys().copied().collect())
            .unwrap_or_default();
        for l in all {
            self.lose(l, reason);
        }
    }

    fn take(&self, lease: u64) -> Option<Held> {
        let h = self.grants.lock().ok()?.remove(&lease)?;
        if let Some(w) = &h.watcher {
            w.abort();
        }
        Some(h)
    }

    async fn ensure(&self, name: &str, capacity: u32) -> Result<(), Error> {
        self.check_open()?;
        validate("semaphore name", name)?;
        if capacity == 0 {
            return Err(invalid("the capacity is zero".into()));
        }
        let key = self.cap_key(name);
        let value = json!({"capacity": capacity, "closed": false});
        let r = self
            .txn(txn(
                vec![absent(&key)],
                vec![
                    put(&key, &value, 0),
                    put(&bump_keys(&key)[0], &json!({}), 0),
                ],
                vec![json!({"request_range": range(&key)})],
            ))
            .await?;
        // The cap key as of this txn, for the acquires to compare instead of reading it.
        if succeeded(&r) {
            self.cache_cap(name, Some((value, header_rev(&r))));
            return Ok(());
        }
        let kv = kvs(&txn_part(&r, 0)).into_iter().next();
        self.cache_cap(name, kv.as_ref().map(|kv| (kv.value.clone(), kv.modr)));
        let existing = kv
            .as_ref()
            .and_then(|kv| kv.value.get("capacity").and_then(Value::as_u64))
            .unwrap_or(0);
        if kv.and_then(|kv| kv.value.get("closed").and_then(Value::as_bool)) == Some(true) {
            return Err(closed(name));
        }
        if existing != u64::from(capacity) {
            return Err(Error::Rejected {
                code: ErrorCode::CapacityMismatch,
                message: format!(
                    "semaphore {name:?} already exists with capacity {existing}, not {capacity}"
                ),
            });
        }
        Ok(())
    }

    async fn release(&self, lease: u64) -> Result<(), Error> {
        let Some(h) = self.take(lease) else {
            return Ok(());
        };
        if let Some(job) = &h.job {
            return self
                .record_end(
                    job,
                    &h,
                    JobEnd::Failed {
                        reason: "the attempt was abandoned",
                    },
                )
                .await;
        }
        let deadline = Instant::now() + self.ttl;
        self.etcd
            .call("/v3/kv/deleterange", &range(&h.key), deadline)
            .await?;
        // The key is gone: its name is free for the next acquire. (Not after a failed
        // delete: the key may still be there, and its slot is never reused.)
        if let Some(slot) = h.slot {
            self.free_slot(slot);
        }
        Ok(())
    }

    async fn shutdown(&self) -> Result<(), Error> {
        if self.shut.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let held: Vec<Held> = self
            .grants
            .lock()
            .map(|mut g| g.drain().map(|(_, h)| h).collect())
            .unwrap_or_default();
        for h in held {
            if let Some(w) = h.watcher {
                w.abort();
            }
        }
        let lease = self.lease.load(Ordering::SeqCst);
        self.revoke(lease, self.deadline()).await
    }

    /// Keeps the etcd lease alive; loses the grants at 90% of the TTL without an
    /// acknowledged keep-alive, or at once when etcd says the lease is gone.
    async fn keep_alive(self: Arc<Self>) {
        let period = self.ttl / 3;
        let tick = self.ttl / 20;
        let mut last_sent: Option<Instant> = None;
        let mut stale = false;
        loop {
            // The loss is declared on time even while a keep-alive is in flight: both the
            // pause and the request end by then.
            let lose_at = self
                .last_ack
                .lock()
                .map(|t| *t)
                .unwrap_or_else(|_| Instant::now())
                + self.ttl.mul_f64(0.9);
            let next = Instant::now() + tick;
            tokio::time::sleep_until(if stale { next } else { next.min(lose_at) }).await;
            if self.shut.load(Ordering::SeqCst) {
                return;
            }
            let due = last_sent.is_none_or(|t| t.elapsed() >= period);
            if due {
                let sent = Instant::now();
                last_sent = Some(sent);
                let lease = self.lease.load(Ordering::SeqCst);
                let mut deadline = sent + self.ttl / 5;
                if !stale {
                    deadline = deadline.min(lose_at);
                }
                match self
                    .etcd
                    .call(
                        "/v3/lease/keepalive",
                        &json!({"ID": lease.to_string()}),
                        deadline,
                    )
                    .await
                {
                    Ok(v) if num(&v, "TTL") > 0 && !stale => {
                        // etcd renewed the lease after `sent`: it lasts at least a TTL from
                        // then, whenever the answer arrived.
                        if let Ok(mut t) = self.last_ack.lock() {
                            *t = sent;
                        }
                    }
                    Ok(v) => {
                        // The lease is gone (or we gave its keys up as unreachable): start
                        // afresh with a new lease under the same session.
                        if num(&v, "TTL") <= 0 && !stale {
                            let reason = match self.get(&self.ended_key(lease)).await {
                                Ok((Some(_), _)) => LostReason::SessionEnded,
                                _ => LostReason::Expired,
                            };
                            self.lose_all(reason);
                        }
                        let _ = self.revoke(lease, self.deadline()).await;
                        let renewed = Instant::now();
                        if self.new_lease(self.deadline()).await.is_ok() {
                            stale = false;
                            if let Ok(mut t) = self.last_ack.lock() {
                                *t = renewed;
                            }
                        }
                    }
                    Err(_) => last_sent = None,
                }
            }
            let silent = self
                .last_ack
                .lock()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            if !stale && silent >= self.ttl.mul_f64(0.9) {
                tracing::warn!(
                    silent_s = silent.as_secs_f64(),
                    "no keep-alive acknowledged by etcd for 90% of the session TTL: leases lost"
                );
                self.lose_all(LostReason::Unreachable);
                stale = true;
            }
        }
    }
}

impl EtcdBackend {
    /// Connects: grants this client's etcd lease and starts keeping it alive.
    pub(crate) async fn connect(url: EtcdUrl, options: Options) -> Result<EtcdBackend, Error> {
        let mut ttl = options.session_ttl.unwrap_or(DEFAULT_TTL);
        if ttl < MIN_TTL {
            tracing::warn!(
                asked_s = ttl.as_secs_f64(),
                "etcd leases last at least 2 s: using a session TTL of 2 s"
            );
            ttl = MIN_TTL;
        }
        // etcd counts whole seconds.
        ttl = Duration::from_secs(ttl.as_secs_f64().ceil() as u64);
        let client = options.client_name.clone().unwrap_or_else(|| {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "unknown".into());
            format!("{host}:{}", std::process::id())
        });
        let label = format!("etcd://{}", url.endpoints.join(","));
        let inner = Arc::new(Inner {
            etcd: Etcd {
                endpoints: url.endpoints,
                current: AtomicUsize::new(0),
                label: label.clone(),
                last_ok: Mutex::new(Instant::now()),
                pool: grpc::Pool::new(),
            },
            prefix: url.prefix,
            session: options.session_id.unwrap_or_else(crate::new_session_id),
            client,
            ttl,
            lease: AtomicI64::new(0),
            next_lease: AtomicU64::new(crate::lease_id_base()),
            sems: Mutex::new(HashMap::new()),
            grants: Mutex::new(HashMap::new()),
            shut: AtomicBool::new(false),
            last_ack: Mutex::new(Instant::now()),
            starter_idle: AtomicBool::new(false),
            starter_wake: tokio::sync::Notify::new(),
        });
        let connect_for = options
            .connect_timeout
            .unwrap_or(ATTEMPT)
            .max(Duration::from_millis(100));
        match inner.new_lease(Instant::now() + connect_for).await {
            Ok(_) => {}
            Err(Error::Unavailable { .. }) => {
                return Err(Error::Connect {
                    addr: label,
                    source: std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "no etcd member answered",
                    ),
                })
            }
            Err(e) => return Err(e),
        }
        if let Ok(mut t) = inner.last_ack.lock() {
            *t = Instant::now();
        }
        let keepalive = tokio::spawn(inner.clone().keep_alive());
        let watch_starter = tokio::spawn(inner.clone().start_watches());
        Ok(EtcdBackend {
            inner,
            keepalive,
            watch_starter,
        })
    }
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        self.keepalive.abort();
        self.watch_starter.abort();
        if !self.inner.shut.swap(true, Ordering::SeqCst) {
            let inner = self.inner.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let lease = inner.lease.load(Ordering::SeqCst);
                    let _ = inner.revoke(lease, inner.deadline()).await;
                });
            }
        }
    }
}

impl Backend for EtcdBackend {
    fn ensure<'a>(&'a self, name: &'a str, capacity: u32) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.inner.ensure(name, capacity))
    }

    fn acquire<'a>(
        &'a self,
        name: &'a str,
        weight: u32,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<Grant, Error>> {
        Box::pin(self.inner.clone().acquire(name, weight, timeout))
    }

    fn release(&self, lease: u64) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.inner.release(lease))
    }

    fn release_in_background(&self, lease: u64) {
        if self.inner.shut.load(Ordering::SeqCst) {
            return;
        }
        let inner = self.inner.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = inner.release(lease).await;
            });
        }
    }

    fn close<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.inner.close(name))
    }

    fn set_capacity<'a>(
        &'a self,
        name: &'a str,
        capacity: u32,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.inner.set_capacity(name, capacity))
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.inner.delete(name))
    }

    fn revoke<'a>(&'a self, name: &'a str, lease: u64) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.inner.force_release(name, lease))
    }

    fn status<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<StatusDoc, Error>> {
        Box::pin(self.inner.status(name))
    }

    fn end_session(&self, session: u64) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.inner.end_session(session))
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.keepalive.abort();
        self.watch_starter.abort();
        Box::pin(self.inner.shutdown())
    }

    fn session_id(&self) -> u64 {
        self.inner.session
    }

    fn unreachable_for(&self) -> Option<Duration> {
        let silent = self.inner.last_ack.lock().map(|t| t.elapsed()).ok()?;
        (silent > self.inner.ttl / 2).then_some(silent)
    }

    fn begin_job<'a>(
        &'a self,
        job: &'a str,
        group: Option<&'a str>,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<JobBegin, Error>> {
        Box::pin(self.inner.clone().begin_job(job, group, timeout))
    }

    fn finish_job<'a>(
        &'a self,
        job: &'a str,
        lease: u64,
        end: JobEnd<'a>,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.inner.finish_job(job, lease, end))
    }

    fn reset_job<'a>(&'a self, job: &'a str) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(self.inner.reset_job(job))
    }

    fn wait_group<'a>(
        &'a self,
        group: &'a str,
        jobs: u32,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<GroupSummary, Error>> {
        Box::pin(self.inner.wait_group(group, jobs, timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the bound, only idle semaphores are forgotten: one with a slot taken (an acquire
    /// in flight or a grant held) keeps its slot numbers, so none is handed out twice.
    #[test]
    fn only_idle_semaphores_are_forgotten() {
        let mut sems: HashMap<String, SemCache> = HashMap::new();
        for i in 0..=MAX_CACHED_SEMAPHORES {
            let slot = Slot {
                name: format!("idle{i}"),
                n: 0,
                etcd_lease: 1,
                fence: 7,
            };
            sems.insert(
                slot.name.clone(),
                SemCache {
                    cap: None,
                    free: vec![slot],
                    next: 1,
                },
            );
        }
        sems.insert(
            "busy".into(),
            SemCache {
                cap: None,
                free: Vec::new(),
                next: 1,
            },
        );
        trim(&mut sems, "idle3");
        let mut left: Vec<&String> = sems.keys().collect();
        left.sort();
        assert_eq!(left, ["busy", "idle3"]);
        // Below the bound nothing goes.
        sems.insert("x".into(), SemCache::default());
        trim(&mut sems, "busy");
        assert_eq!(sems.len(), 3);
    }

    #[test]
    fn urls_and_keys() {
        let u = parse_url("a:1,b:2/team/x").expect("valid");
        assert_eq!(u.endpoints, vec!["a:1", "b:2"]);
        assert_eq!(u.prefix, "team/x");
        assert_eq!(parse_url("a:1").expect("valid").prefix, "turnstile");
        assert!(parse_url("").is_err());
        assert!(parse_url("a").is_err());
        assert!(parse_url("a:x").is_err());
        assert_eq!(unesc(&esc("a/b%2F")), "a/b%2F");
        assert!(!esc("a/b").contains('/'));
        assert_eq!(unb64(&range_end("p/q/")).as_deref(), Some(&b"p/q0"[..]));
    }
}
