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

pub(crate) mod grpc;
pub(crate) mod pb;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use turnstile_proto::{
    CompletionStatus, ErrorCode, GroupStatus, HolderStatus, JobStatus, RunningStatus,
    SemaphoreStatus, StatusDoc, WaiterStatus,
};

use self::grpc::Stream;
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Escapes a name so that it holds no `/` (which would nest one name's keys in another's).
fn esc(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

fn unesc(name: &str) -> String {
    name.replace("%2F", "/").replace("%25", "%")
}

/// The end of the key range of everything under `prefix`.
fn range_end(prefix: &str) -> String {
    let mut b = prefix.as_bytes().to_vec();
    while let Some(&last) = b.last() {
        if last < 0xff {
            if let Some(l) = b.last_mut() {
                *l += 1;
            }
            break;
        }
        b.pop();
    }
    b64(&b)
}

fn invalid(message: String) -> Error {
    Error::Rejected {
        code: ErrorCode::InvalidArgument,
        message,
    }
}

fn validate(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(invalid(format!("{what} is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "{what} is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(format!("{what} contains a control character")));
    }
    Ok(())
}

fn closed(name: &str) -> Error {
    Error::Rejected {
        code: ErrorCode::Closed,
        message: format!("semaphore {name:?} is closed"),
    }
}

fn too_heavy(name: &str, weight: u64, capacity: u64) -> Error {
    Error::Rejected {
        code: ErrorCode::WeightExceedsCapacity,
        message: format!("weight {weight} exceeds the capacity {capacity} of semaphore {name:?}"),
    }
}

fn capacity_of(cap: &Value) -> u64 {
    cap.get("capacity").and_then(Value::as_u64).unwrap_or(0)
}

fn is_closed(cap: &Value) -> bool {
    cap.get("closed").and_then(Value::as_bool) == Some(true)
}

/// The create revision up to which queue keys hold whatever the capacity (see
/// [`Inner::set_capacity`]); 0 when the capacity never shrank under holders.
fn held_to_of(cap: &Value) -> i64 {
    cap.get("held_to").and_then(Value::as_i64).unwrap_or(0)
}

/// The holder rule: a queue key created at `create`, whose weight plus the weights of every
/// key created before it come to `through`, holds if that fits the capacity, or if it held
/// when the capacity last changed (`held_to`).
fn holds(create: i64, through: u64, capacity: u64, held_to: i64) -> bool {
    through <= capacity || create <= held_to
}

fn weight_of(kv: &Kv) -> u64 {
    kv.value.get("w").and_then(Value::as_u64).unwrap_or(0)
}

/// How many keys at the head of `queue` (in create order) hold under `cap`. The holders are
/// always a prefix of the queue: both halves of [`holds`] pick one.
fn holder_count(cap: &Value, queue: &[Kv]) -> usize {
    let (capacity, held_to) = (capacity_of(cap), held_to_of(cap));
    let mut through = 0;
    queue
        .iter()
        .take_while(|kv| {
            through += weight_of(kv);
            holds(kv.create, through, capacity, held_to)
        })
        .count()
}

/// The marker of a lease released by force: `.../r/LEASE` for lease `lease`, whose key is
/// `key` (`.../q/...`). Named by the lease, not by the key, since a semaphore's key names are
/// reused by later acquires of the same client ([`Inner::acquire`]).
fn revoked_of(key: &str, lease: u64) -> String {
    match key.rsplit_once("/q/") {
        Some((dir, _)) => format!("{dir}/r/{lease:016x}"),
        None => format!("{key}/r"),
    }
}

/// The turnstile lease id of a queue key: the `l` of its value, or (a key written by a
/// client from before slots, or a job's attempt) its name's last part.
fn lease_id_of(kv: &Kv) -> u64 {
    kv.value
        .get("l")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| {
            kv.key
                .rsplit('/')
                .next()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .unwrap_or(0)
        })
}

/// The two markers of a capacity change, `s/NAME/cap.a` and `s/NAME/cap.b`: one exists;
/// set-capacity deletes it and creates the other, so that waiters, which watch deletions only
/// (a put to the cap key would be filtered out), hear of the change.
fn bump_keys(cap_key: &str) -> [String; 2] {
    [format!("{cap_key}.a"), format!("{cap_key}.b")]
}

/// What a semaphore's waiter follows besides the keys ahead of it (see [`Inner::wait_turn`]).
struct Resize<'a> {
    name: &'a str,
    cap_key: &'a str,
    weight: u64,
    /// The waiter's own key's create revision.
    create: i64,
    capacity: u64,
    held_to: i64,
}

fn no_such(name: &str) -> Error {
    Error::Rejected {
        code: ErrorCode::NoSuchSemaphore,
        message: format!("semaphore {name:?} does not exist"),
    }
}

/// The tombstone of queue key `.../q/LEASE`: `.../x/LEASE`.
fn tomb_of(key: &str) -> String {
    match key.rsplit_once("/q/") {
        Some((dir, lease)) => format!("{dir}/x/{lease}"),
        None => format!("{key}/x"),
    }
}

/// An int64 as protobuf's JSON mapping writes it (a string; absent when zero).
fn num(v: &Value, field: &str) -> i64 {
    match v.get(field) {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn header_rev(v: &Value) -> i64 {
    v.get("header").map(|h| num(h, "revision")).unwrap_or(0)
}

/// A key-value pair from a response.
#[derive(Clone, Debug)]
struct Kv {
    key: String,
    value: Value,
    create: i64,
    modr: i64,
    lease: i64,
}

fn kv_of(v: &Value) -> Kv {
    let text = |f: &str| {
        v.get(f)
            .and_then(Value::as_str)
            .and_then(unb64)
            .unwrap_or_default()
    };
    Kv {
        key: String::from_utf8_lossy(&text("key")).into_owned(),
        value: serde_json::from_slice(&text("value")).unwrap_or(Value::Null),
        create: num(v, "create_revision"),
        modr: num(v, "mod_revision"),
        lease: num(v, "lease"),
    }
}

fn kvs(resp: &Value) -> Vec<Kv> {
    resp.get("kvs")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(kv_of).collect())
        .unwrap_or_default()
}

/// The `i`th response of a txn (a range's body, or whatever the op returned).
fn txn_part(resp: &Value, i: usize) -> Value {
    resp.get("responses")
        .and_then(|r| r.get(i))
        .and_then(|r| {
            r.get("response_range")
                .or_else(|| r.get("response_put"))
                .or_else(|| r.get("response_delete_range"))
        })
        .cloned()
        .unwrap_or(Value::Null)
}

fn succeeded(resp: &Value) -> bool {
    resp.get("succeeded").and_then(Value::as_bool) == Some(true)
}

fn range(key: &str) -> Value {
    json!({"key": b64(key.as_bytes())})
}

fn range_prefix(prefix: &str) -> Value {
    json!({"key": b64(prefix.as_bytes()), "range_end": range_end(prefix)})
}

fn put(key: &str, value: &Value, lease: i64) -> Value {
    let mut p = json!({"key": b64(key.as_bytes()), "value": b64(value.to_string().as_bytes())});
    if lease != 0 {
        p["lease"] = json!(lease.to_string());
    }
    json!({ "request_put": p })
}

fn delete(key: &str) -> Value {
    json!({"request_delete_range": {"key": b64(key.as_bytes())}})
}

fn delete_prefix(prefix: &str) -> Value {
    json!({"request_delete_range": range_prefix(prefix)})
}

fn absent(key: &str) -> Value {
    json!({"target": "CREATE", "key": b64(key.as_bytes()), "create_revision": "0", "result": "EQUAL"})
}

fn exists(key: &str) -> Value {
    json!({"target": "VERSION", "key": b64(key.as_bytes()), "version": "0", "result": "GREATER"})
}

/// `key` exists and is the key created at revision `create`.
fn created_at(key: &str, create: i64) -> Value {
    json!({"target": "CREATE", "key": b64(key.as_bytes()), "create_revision": create.to_string(), "result": "EQUAL"})
}

/// No key under `prefix` was created after revision `rev` (true of an empty range too).
fn none_created_after(prefix: &str, rev: i64) -> Value {
    json!({"target": "CREATE", "key": b64(prefix.as_bytes()), "range_end": range_end(prefix),
           "create_revision": (rev + 1).to_string(), "result": "LESS"})
}

/// No key under `prefix` (every key's create revision compares to 0, an absent one's is 0).
fn empty_range(prefix: &str) -> Value {
    json!({"target": "CREATE", "key": b64(prefix.as_bytes()), "range_end": range_end(prefix),
           "create_revision": "0", "result": "EQUAL"})
}

/// `key`'s mod revision is `modr` (0: the key is absent), with protobuf's defaults left out
/// of the JSON (see [`Inner::acquire`]).
fn mod_is(key: &str, modr: i64) -> Value {
    let mut c = json!({"key": b64(key.as_bytes()), "target": "MOD"});
    if modr != 0 {
        c["mod_revision"] = json!(modr.to_string());
    }
    c
}

fn unchanged(key: &str, modr: i64) -> Value {
    json!({"target": "MOD", "key": b64(key.as_bytes()), "mod_revision": modr.to_string(), "result": "EQUAL"})
}

fn txn(compare: Vec<Value>, success: Vec<Value>, failure: Vec<Value>) -> Value {
    json!({"compare": compare, "success": success, "failure": failure})
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
    lost: watch::Sender<Option<LostReason>>,
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
            let _ = h.lost.send(Some(reason));
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

    /// Opens a watch of deletions of `key` (or of everything under it with `prefix`) from
    /// revision `from`, on the endpoint in use, failing over until `deadline`.
    async fn open_watch(
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
    async fn open_watch_range(
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
    async fn wait_turn(
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
    fn hold(
        self: &Arc<Self>,
        lease: u64,
        key: String,
        cap: Option<String>,
        job: Option<String>,
        token: u64,
        from: i64,
        slot: Option<Slot>,
    ) -> watch::Receiver<Option<LostReason>> {
        let (tx, rx) = watch::channel(None);
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
    async fn start_watches(self: Arc<Self>) {
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
    fn watch_held(self: &Arc<Self>, lease: u64, wkey: String, p: PendingWatch) -> AbortHandle {
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
    async fn acquire(
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
    async fn gone(&self, name: &str, cap_key: &str, lease: i64) -> Error {
        match self.why_lost(Some(cap_key), lease).await {
            LostReason::Closed => closed(name),
            _ => Error::SessionLost,
        }
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

    async fn close(&self, name: &str) -> Result<(), Error> {
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
    async fn read_semaphore(&self, name: &str) -> Result<(Kv, Vec<Kv>, i64, Option<Kv>), Error> {
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
    async fn set_capacity(&self, name: &str, capacity: u32) -> Result<(), Error> {
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
    async fn delete(&self, name: &str) -> Result<(), Error> {
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
    async fn force_release(&self, name: &str, lease: u64) -> Result<(), Error> {
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
    fn semaphore_status(name: String, cap: &Value, mut queue: Vec<Kv>) -> SemaphoreStatus {
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

    async fn status(&self, name: Option<&str>) -> Result<StatusDoc, Error> {
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

    async fn end_session(&self, session: u64) -> Result<(), Error> {
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

/// A job's metadata (`j/JOB/meta`).
fn job_status(name: String, meta: &Value, mut queue: Vec<Kv>) -> JobStatus {
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

fn completion_of(done: &Value) -> JobCompletion {
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

fn done_of(meta: &Value) -> Option<&Value> {
    meta.get("done").filter(|d| !d.is_null())
}

impl Inner {
    /// Puts `job` in `group` (a compare-and-swap on its metadata).
    async fn set_group(&self, job: &str, group: &str) -> Result<(), Error> {
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

    async fn begin_job(
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
    async fn record_end(&self, job: &str, h: &Held, end: JobEnd<'_>) -> Result<(), Error> {
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

    async fn finish_job(&self, job: &str, lease: u64, end: JobEnd<'_>) -> Result<(), Error> {
        self.check_open()?;
        let Some(h) = self.take(lease) else {
            return Err(Error::Rejected {
                code: ErrorCode::UnknownLease,
                message: format!("lease {lease} of job {job:?} is not held"),
            });
        };
        self.record_end(job, &h, end).await
    }

    async fn reset_job(&self, job: &str) -> Result<bool, Error> {
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

    async fn group_summary(&self, group: &str) -> Result<(GroupSummary, i64), Error> {
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

    async fn wait_group(
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
