//! Key names, and the requests and answers of etcd's KV API as the backend builds and reads
//! them (the JSON shapes of etcd's gateway, which `pb` turns into protobuf).

use super::*;

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Escapes a name so that it holds no `/` (which would nest one name's keys in another's).
pub(super) fn esc(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

pub(super) fn unesc(name: &str) -> String {
    name.replace("%2F", "/").replace("%25", "%")
}

/// The end of the key range of everything under `prefix`.
pub(super) fn range_end(prefix: &str) -> String {
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

pub(super) fn invalid(message: String) -> Error {
    Error::Rejected {
        code: ErrorCode::InvalidArgument,
        message,
    }
}

pub(super) fn validate(what: &str, name: &str) -> Result<(), Error> {
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

pub(super) fn closed(name: &str) -> Error {
    Error::Rejected {
        code: ErrorCode::Closed,
        message: format!("semaphore {name:?} is closed"),
    }
}

pub(super) fn too_heavy(name: &str, weight: u64, capacity: u64) -> Error {
    Error::Rejected {
        code: ErrorCode::WeightExceedsCapacity,
        message: format!("weight {weight} exceeds the capacity {capacity} of semaphore {name:?}"),
    }
}

pub(super) fn capacity_of(cap: &Value) -> u64 {
    cap.get("capacity").and_then(Value::as_u64).unwrap_or(0)
}

pub(super) fn is_closed(cap: &Value) -> bool {
    cap.get("closed").and_then(Value::as_bool) == Some(true)
}

/// The create revision up to which queue keys hold whatever the capacity (see
/// [`Inner::set_capacity`]); 0 when the capacity never shrank under holders.
pub(super) fn held_to_of(cap: &Value) -> i64 {
    cap.get("held_to").and_then(Value::as_i64).unwrap_or(0)
}

/// The holder rule: a queue key created at `create`, whose weight plus the weights of every
/// key created before it come to `through`, holds if that fits the capacity, or if it held
/// when the capacity last changed (`held_to`).
pub(super) fn holds(create: i64, through: u64, capacity: u64, held_to: i64) -> bool {
    through <= capacity || create <= held_to
}

pub(super) fn weight_of(kv: &Kv) -> u64 {
    kv.value.get("w").and_then(Value::as_u64).unwrap_or(0)
}

/// How many keys at the head of `queue` (in create order) hold under `cap`. The holders are
/// always a prefix of the queue: both halves of [`holds`] pick one.
pub(super) fn holder_count(cap: &Value, queue: &[Kv]) -> usize {
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
pub(super) fn revoked_of(key: &str, lease: u64) -> String {
    match key.rsplit_once("/q/") {
        Some((dir, _)) => format!("{dir}/r/{lease:016x}"),
        None => format!("{key}/r"),
    }
}

/// The turnstile lease id of a queue key: the `l` of its value, or (a key written by a
/// client from before slots, or a job's attempt) its name's last part.
pub(super) fn lease_id_of(kv: &Kv) -> u64 {
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
pub(super) fn bump_keys(cap_key: &str) -> [String; 2] {
    [format!("{cap_key}.a"), format!("{cap_key}.b")]
}

/// What a semaphore's waiter follows besides the keys ahead of it (see [`Inner::wait_turn`]).
pub(super) struct Resize<'a> {
    pub(super) name: &'a str,
    pub(super) cap_key: &'a str,
    pub(super) weight: u64,
    /// The waiter's own key's create revision.
    pub(super) create: i64,
    pub(super) capacity: u64,
    pub(super) held_to: i64,
}

pub(super) fn no_such(name: &str) -> Error {
    Error::Rejected {
        code: ErrorCode::NoSuchSemaphore,
        message: format!("semaphore {name:?} does not exist"),
    }
}

/// The tombstone of queue key `.../q/LEASE`: `.../x/LEASE`.
pub(super) fn tomb_of(key: &str) -> String {
    match key.rsplit_once("/q/") {
        Some((dir, lease)) => format!("{dir}/x/{lease}"),
        None => format!("{key}/x"),
    }
}

/// An int64 as protobuf's JSON mapping writes it (a string; absent when zero).
pub(super) fn num(v: &Value, field: &str) -> i64 {
    match v.get(field) {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

pub(super) fn header_rev(v: &Value) -> i64 {
    v.get("header").map(|h| num(h, "revision")).unwrap_or(0)
}

/// A key-value pair from a response.
#[derive(Clone, Debug)]
pub(super) struct Kv {
    pub(super) key: String,
    pub(super) value: Value,
    pub(super) create: i64,
    pub(super) modr: i64,
    pub(super) lease: i64,
}

pub(super) fn kv_of(v: &Value) -> Kv {
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

pub(super) fn kvs(resp: &Value) -> Vec<Kv> {
    resp.get("kvs")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(kv_of).collect())
        .unwrap_or_default()
}

/// The `i`th response of a txn (a range's body, or whatever the op returned).
pub(super) fn txn_part(resp: &Value, i: usize) -> Value {
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

pub(super) fn succeeded(resp: &Value) -> bool {
    resp.get("succeeded").and_then(Value::as_bool) == Some(true)
}

pub(super) fn range(key: &str) -> Value {
    json!({"key": b64(key.as_bytes())})
}

pub(super) fn range_prefix(prefix: &str) -> Value {
    json!({"key": b64(prefix.as_bytes()), "range_end": range_end(prefix)})
}

pub(super) fn put(key: &str, value: &Value, lease: i64) -> Value {
    let mut p = json!({"key": b64(key.as_bytes()), "value": b64(value.to_string().as_bytes())});
    if lease != 0 {
        p["lease"] = json!(lease.to_string());
    }
    json!({ "request_put": p })
}

pub(super) fn delete(key: &str) -> Value {
    json!({"request_delete_range": {"key": b64(key.as_bytes())}})
}

pub(super) fn delete_prefix(prefix: &str) -> Value {
    json!({"request_delete_range": range_prefix(prefix)})
}

pub(super) fn absent(key: &str) -> Value {
    json!({"target": "CREATE", "key": b64(key.as_bytes()), "create_revision": "0", "result": "EQUAL"})
}

pub(super) fn exists(key: &str) -> Value {
    json!({"target": "VERSION", "key": b64(key.as_bytes()), "version": "0", "result": "GREATER"})
}

/// `key` exists and is the key created at revision `create`.
pub(super) fn created_at(key: &str, create: i64) -> Value {
    json!({"target": "CREATE", "key": b64(key.as_bytes()), "create_revision": create.to_string(), "result": "EQUAL"})
}

/// No key under `prefix` was created after revision `rev` (true of an empty range too).
pub(super) fn none_created_after(prefix: &str, rev: i64) -> Value {
    json!({"target": "CREATE", "key": b64(prefix.as_bytes()), "range_end": range_end(prefix),
           "create_revision": (rev + 1).to_string(), "result": "LESS"})
}

/// No key under `prefix` (every key's create revision compares to 0, an absent one's is 0).
pub(super) fn empty_range(prefix: &str) -> Value {
    json!({"target": "CREATE", "key": b64(prefix.as_bytes()), "range_end": range_end(prefix),
           "create_revision": "0", "result": "EQUAL"})
}

/// `key`'s mod revision is `modr` (0: the key is absent), with protobuf's defaults left out
/// of the JSON (see [`Inner::acquire`]).
pub(super) fn mod_is(key: &str, modr: i64) -> Value {
    let mut c = json!({"key": b64(key.as_bytes()), "target": "MOD"});
    if modr != 0 {
        c["mod_revision"] = json!(modr.to_string());
    }
    c
}

pub(super) fn unchanged(key: &str, modr: i64) -> Value {
    json!({"target": "MOD", "key": b64(key.as_bytes()), "mod_revision": modr.to_string(), "result": "EQUAL"})
}

pub(super) fn txn(compare: Vec<Value>, success: Vec<Value>, failure: Vec<Value>) -> Value {
    json!({"compare": compare, "success": success, "failure": failure})
}
