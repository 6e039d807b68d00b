//! The native half of the Python package `turnstile` (`turnstile._native`): thin handles over
//! [`turnstile_client`], which owns sessions, keep-alive, retries and every backend. The Python
//! half (`python/turnstile/__init__.py`) builds the public API (Dask's names and errors,
//! pickling, asyncio) on these handles.
//!
//! Four rules shape this module:
//! - **One session per process and (URL, TTL)**, created lazily on first use. A forked child
//!   inherits the parent's runtime and clients, but not the threads that drive them, so
//!   everything here remembers the pid that created it: in another process it is *forgotten*
//!   (leaked, never dropped: dropping a file-backend client would release the parent's leases,
//!   and a runtime would wait for threads that do not exist, or find its scheduler taken by
//!   one), and a fresh one is made.
//! - **The GIL is released while waiting**, and a blocking wait wakes every [`SIGNAL_POLL`] to
//!   let Python run its signal handlers; if one raises (Ctrl-C), the wait's future is dropped,
//!   which withdraws a queued acquire.
//! - **The thread that waits drives the I/O** ([`DrivenRuntime`]): a Python thread inside a
//!   blocking call runs the client's tasks itself (no thread hand-off per call), and the
//!   runtime's keeper thread runs them while no Python thread waits. So a task may run on any
//!   thread that waits, and tasks that take the GIL (the callbacks of `acquire_async` and
//!   `on_lost`) do: every wait therefore releases the GIL *before* it enters the runtime
//!   ([`block`] detaches first), and nothing holding the GIL waits on the runtime (the only
//!   other uses with the GIL held are `spawn`s, which do not wait).
//! - **No panic reaches Python**: errors become the classes of `turnstile._errors`, and locks
//!   recover from poisoning (no lock is held across a call that could panic halfway through
//!   an update).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use turnstile_client as tc;
use turnstile_client::driven::DrivenRuntime;

/// How often a blocking wait lets Python check for signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// A process's runtime, and the tick that wakes blocking waits to check for signals.
///
/// The tick is one interval task per process rather than a timer per wait: a timer set from a
/// Python thread that does not drive the runtime (another one does) and is due before the
/// runtime's next one must wake the driving thread to re-arm its wait, an extra thread switch.
struct Ctx {
    rt: DrivenRuntime,
    tick: Arc<tokio::sync::Notify>,
}

impl std::ops::Deref for Ctx {
    type Target = DrivenRuntime;
    fn deref(&self) -> &DrivenRuntime {
        &self.rt
    }
}

/// This process's runtime and clients. Locked only by Python threads holding the GIL, and
/// never across a wait, so a `fork` (which needs the GIL) never finds it locked.
struct Registry {
    pid: u32,
    rt: Arc<Ctx>,
    clients: HashMap<(String, Option<u64>), tc::Client>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is a cache, still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This process's runtime, made on first use (again in a forked child).
fn runtime() -> PyResult<Arc<Ctx>> {
    let mut reg = lock(&REGISTRY);
    let pid = std::process::id();
    if let Some(r) = reg.as_ref().filter(|r| r.pid == pid) {
        return Ok(r.rt.clone());
    }
    if let Some(inherited) = reg.take() {
        // The parent's: its threads do not exist in this process (see the module doc).
        std::mem::forget(inherited);
    }
    let rt = tc::driven::DrivenRuntime::new("turnstile-client")
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the turnstile runtime: {e}")))?;
    let tick = Arc::new(tokio::sync::Notify::new());
    let ticker = tick.clone();
    rt.spawn(async move {
        let mut every = tokio::time::interval(SIGNAL_POLL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            ticker.notify_waiters();
        }
    });
    let rt = Arc::new(Ctx { rt, tick });
    *reg = Some(Registry {
        pid,
        rt: rt.clone(),
        clients: HashMap::new(),
    });
    Ok(rt)
}

/// This process's client for `url` with session TTL `ttl_ms`, connected on first use.
fn client(py: Python<'_>, url: &str, ttl_ms: Option<u64>) -> PyResult<(Arc<Ctx>, tc::Client)> {
    let rt = runtime()?;
    let key = (url.to_owned(), ttl_ms);
    if let Some(c) = lock(&REGISTRY)
        .as_ref()
        .and_then(|r| r.clients.get(&key))
        .cloned()
    {
        return Ok((rt, c));
    }
    let options = tc::Options {
        session_ttl: ttl_ms.map(Duration::from_millis),
        ..tc::Options::default()
    };
    let url_owned = url.to_owned();
    let fresh = block(py, &rt, async move {
        tc::Client::connect_with(&url_owned, options).await
    })?
    .map_err(|e| error(py, &e, &format!("turnstile at {url}")))?;
    // Connected without the lock: another thread may have connected meanwhile; keep one.
    let mut reg = lock(&REGISTRY);
    let kept = match reg.as_mut().filter(|r| r.pid == std::process::id()) {
        Some(r) => r
            .clients
            .entry(key)
            .or_insert_with(|| fresh.clone())
            .clone(),
        None => fresh.clone(),
    };
    drop(reg);
    if kept.session_id() != fresh.session_id() {
        let spare = fresh;
        rt.spawn(async move {
            let _ = spare.shutdown().await;
        });
    }
    Ok((rt, kept))
}

/// Runs `fut` on `rt` with the GIL released, waking every [`SIGNAL_POLL`] to run Python's
/// signal handlers. `Err` if a handler raised (the future is dropped: a queued acquire is
/// withdrawn); otherwise the future's own result.
fn block<F, T>(py: Python<'_>, rt: &Ctx, fut: F) -> PyResult<T>
where
    F: Future<Output = T> + Send,
    T: Send,
{
    py.detach(|| {
        rt.block_on(async {
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    biased;
                    out = &mut fut => return Ok(out),
                    () = rt.tick.notified() => {
                        Python::attach(|py| py.check_signals())?;
                    }
                }
            }
        })
    })
}

/// Seconds (a Python float) to a duration; `None` stays `None`.
fn seconds(what: &str, s: Option<f64>) -> PyResult<Option<Duration>> {
    match s {
        None => Ok(None),
        Some(s) if s.is_nan() => Err(PyValueError::new_err(format!("{what} is NaN"))),
        Some(s) if s <= 0.0 => Ok(Some(Duration::ZERO)),
        // About 31 years: longer is forever for every purpose here, and stays in range.
        Some(s) => Ok(Some(Duration::from_secs_f64(s.min(1e9)))),
    }
}

/// The one-line message of a client error: its text and its causes, joined by ": ".
fn message(e: &tc::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A client error as an exception of `turnstile._errors`; `what` names the thing it was about
/// ("semaphore `db`").
fn error(py: Python<'_>, e: &tc::Error, what: &str) -> PyErr {
    use tc::ErrorCode as C;
    let (class, text) = match e {
        tc::Error::InvalidUrl { .. } => ("InvalidURLError", message(e)),
        tc::Error::Storage { .. } => ("StorageError", format!("{what}: {}", message(e))),
        tc::Error::Connect { .. } => ("ConnectError", format!("{what}: {}", message(e))),
        tc::Error::TimedOut => ("AcquireTimeout", format!("{what}: {}", message(e))),
        tc::Error::SessionLost => ("SessionLostError", format!("{what}: {}", message(e))),
        tc::Error::LeaseLost(_) => ("LeaseLostError", format!("{what}: {}", message(e))),
        tc::Error::Rejected { code, message: m } => match code {
            C::CapacityMismatch => ("CapacityMismatchError", format!("{what}: {m}")),
            // Dask's words, which its users match on.
            C::Closed | C::NoSuchSemaphore => (
                "SemaphoreClosedError",
                format!("{what} not known or already closed ({m})"),
            ),
            C::InvalidArgument | C::WeightExceedsCapacity => {
                ("InvalidArgumentError", format!("{what}: {m}"))
            }
            _ => ("TurnstileError", format!("{what}: {m}")),
        },
        tc::Error::Protocol(_) => ("ProtocolError", format!("{what}: {}", message(e))),
        _ => ("TurnstileError", format!("{what}: {}", message(e))),
    };
    let class = py
        .import("turnstile._errors")
        .and_then(|m| m.getattr(class));
    match class {
        Ok(class) => match class.call1((text.clone(),)) {
            Ok(instance) => PyErr::from_value(instance),
            Err(err) => err,
        },
        // The package is incomplete; still one line naming the thing.
        Err(_) => PyRuntimeError::new_err(text),
    }
}

fn lost_name(r: tc::LostReason) -> &'static str {
    match r {
        tc::LostReason::Expired => "expired",
        tc::LostReason::Closed => "closed",
        tc::LostReason::SessionEnded => "session ended",
        tc::LostReason::Unreachable => "unreachable",
        tc::LostReason::Forgotten => "forgotten",
        tc::LostReason::Revoked => "revoked",
    }
}

/// A semaphore as one process sees it: its URL, name, capacity and session TTL, and (once
/// used in this process) its handle on this process's client.
#[pyclass(frozen, module = "turnstile._native")]
struct SemaphoreCore {
    url: String,
    name: String,
    capacity: u32,
    ttl_ms: Option<u64>,
    /// The pid that made the handle, and the handle.
    handle: Mutex<Option<(u32, tc::Semaphore)>>,
}

impl SemaphoreCore {
    fn what(&self) -> String {
        format!("Semaphore `{}`", self.name)
    }

    /// This process's handle, connecting and creating (or checking) the semaphore on first use.
    fn handle(&self, py: Python<'_>) -> PyResult<(Arc<Ctx>, tc::Semaphore)> {
        let pid = std::process::id();
        {
            let mut h = lock(&self.handle);
            match h.take() {
                Some((p, sem)) if p == pid => {
                    let sem2 = sem.clone();
                    *h = Some((p, sem));
                    return Ok((runtime()?, sem2));
                }
                Some(inherited) => std::mem::forget(inherited),
                None => {}
            }
        }
        let (rt, client) = client(py, &self.url, self.ttl_ms)?;
        let (name, capacity) = (self.name.clone(), self.capacity);
        let sem = block(
            py,
            &rt,
            async move { client.semaphore(&name, capacity).await },
        )?
        .map_err(|e| error(py, &e, &self.what()))?;
        *lock(&self.handle) = Some((pid, sem.clone()));
        Ok((rt, sem))
    }

    fn lease(&self, rt: Arc<Ctx>, permit: tc::Permit) -> Lease {
        Lease {
            pid: std::process::id(),
            rt,
            lease_id: permit.lease_id(),
            fencing_token: permit.fencing_token(),
            semaphore: self.name.clone(),
            session: permit.session_id(),
            permit: Arc::new(Mutex::new(Some(permit))),
        }
    }
}

impl Drop for SemaphoreCore {
    fn drop(&mut self) {
        let h = self.handle.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some((pid, sem)) = h.take() {
            if pid != std::process::id() {
                std::mem::forget(sem);
            }
        }
    }
}

#[pymethods]
impl SemaphoreCore {
    #[new]
    #[pyo3(signature = (url, name, capacity, session_ttl=None))]
    fn new(url: String, name: String, capacity: i64, session_ttl: Option<f64>) -> PyResult<Self> {
        let capacity = u32::try_from(capacity)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "max_leases of Semaphore `{name}` must be from 1 to {}, not {capacity}",
                    u32::MAX
                ))
            })?;
        let ttl_ms = match seconds("session_ttl", session_ttl)? {
            Some(d) if d.is_zero() => {
                return Err(PyValueError::new_err("session_ttl must be positive"))
            }
            Some(d) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)),
            None => None,
        };
        Ok(SemaphoreCore {
            url,
            name,
            capacity,
            ttl_ms,
            handle: Mutex::new(None),
        })
    }

    /// Whether this process has connected (so that calls do not wait to connect first).
    #[getter]
    fn connected(&self) -> bool {
        lock(&self.handle)
            .as_ref()
            .is_some_and(|(pid, _)| *pid == std::process::id())
    }

    /// Connects (if this process has not yet) and creates or checks the semaphore.
    fn connect(&self, py: Python<'_>) -> PyResult<()> {
        self.handle(py).map(drop)
    }

    /// Waits for a permit: the lease, or `None` when `timeout` (seconds; 0 tries once) passed.
    #[pyo3(signature = (timeout=None, weight=1))]
    fn acquire(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        weight: u32,
    ) -> PyResult<Option<Lease>> {
        let timeout = seconds("timeout", timeout)?;
        let (rt, sem) = self.handle(py)?;
        let out = block(py, &rt, async move {
            match timeout {
                None => sem.acquire_many(weight).await,
                Some(t) => sem.acquire_many_timeout(weight, t).await,
            }
        })?;
        match out {
            Ok(permit) => Ok(Some(self.lease(rt, permit))),
            Err(tc::Error::TimedOut) => Ok(None),
            Err(e) => Err(error(py, &e, &self.what())),
        }
    }

    /// Starts an acquire on the client's runtime and returns at once; `callback(lease, error)`
    /// is called on the thread driving the runtime (see the module doc) with the outcome (`lease` is `None` on timeout).
    /// [`PendingAcquire::cancel`] withdraws it.
    #[pyo3(signature = (callback, timeout=None, weight=1))]
    fn acquire_async(
        slf: Bound<'_, Self>,
        callback: Py<PyAny>,
        timeout: Option<f64>,
        weight: u32,
    ) -> PyResult<PendingAcquire> {
        let py = slf.py();
        let timeout = seconds("timeout", timeout)?;
        let me = slf.get();
        let (rt, sem) = me.handle(py)?;
        let core: Py<SemaphoreCore> = slf.clone().unbind();
        let rt2 = rt.clone();
        let task = rt.spawn(async move {
            let out = match timeout {
                None => sem.acquire_many(weight).await,
                Some(t) => sem.acquire_many_timeout(weight, t).await,
            };
            // `try_attach`: at interpreter shutdown there is nobody left to tell (and `attach`
            // would panic); a permit not handed over is dropped, which releases it.
            Python::try_attach(|py| {
                let core = core.get();
                let args = match out {
                    Ok(permit) => match Py::new(py, core.lease(rt2, permit)) {
                        Ok(lease) => (lease.into_any(), py.None()),
                        Err(e) => (py.None(), e.into_value(py).into_any()),
                    },
                    Err(tc::Error::TimedOut) => (py.None(), py.None()),
                    Err(e) => (
                        py.None(),
                        error(py, &e, &core.what()).into_value(py).into_any(),
                    ),
                };
                if let Err(e) = callback.call1(py, args) {
                    e.write_unraisable(py, None);
                }
            });
        });
        Ok(PendingAcquire {
            abort: Mutex::new(Some(task.abort_handle())),
        })
    }

    /// `(in_use, queued)`: permits held now by every client, and acquires waiting.
    fn counts(&self, py: Python<'_>) -> PyResult<(u32, u64)> {
        let (rt, sem) = self.handle(py)?;
        let (client_url, ttl) = (self.url.clone(), self.ttl_ms);
        let (_, client) = client(py, &client_url, ttl)?;
        let name = sem.name().to_owned();
        let doc = block(py, &rt, async move { client.status(Some(&name)).await })?
            .map_err(|e| error(py, &e, &self.what()))?;
        Ok(doc
            .semaphores
            .iter()
            .find(|s| s.name == self.name)
            .map_or((0, 0), |s| (s.in_use, s.queued)))
    }

    /// Closes the semaphore for everyone: holders lose their leases, later acquires fail.
    /// `False` if it was already closed (or never existed).
    fn close(&self, py: Python<'_>) -> PyResult<bool> {
        let (rt, client) = client(py, &self.url, self.ttl_ms)?;
        let name = self.name.clone();
        match block(py, &rt, async move { client.close(&name).await })? {
            Ok(()) => Ok(true),
            Err(tc::Error::Rejected {
                code: tc::ErrorCode::Closed | tc::ErrorCode::NoSuchSemaphore,
                ..
            }) => Ok(false),
            Err(e) => Err(error(py, &e, &self.what())),
        }
    }

    /// The URL.
    #[getter]
    fn url(&self) -> &str {
        &self.url
    }

    /// The name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// The capacity.
    #[getter]
    fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The session TTL asked for, in seconds (`None`: the backend's default).
    #[getter]
    fn session_ttl(&self) -> Option<f64> {
        self.ttl_ms.map(|ms| ms as f64 / 1000.0)
    }
}

/// An acquire started by `SemaphoreCore.acquire_async`.
#[pyclass(frozen, module = "turnstile._native")]
struct PendingAcquire {
    abort: Mutex<Option<tokio::task::AbortHandle>>,
}

#[pymethods]
impl PendingAcquire {
    /// Withdraws the acquire (its future is dropped, which releases the lease id whether it
    /// was queued or already granted). The callback is then not called, unless it already was.
    fn cancel(&self) {
        if let Some(a) = lock(&self.abort).take() {
            a.abort();
        }
    }
}

/// A held permit: its lease.
#[pyclass(frozen, module = "turnstile._native")]
struct Lease {
    pid: u32,
    rt: Arc<Ctx>,
    lease_id: u64,
    fencing_token: u64,
    semaphore: String,
    session: u64,
    /// `None` once released.
    permit: Arc<Mutex<Option<tc::Permit>>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            // The parent's lease, in a forked child: not this process's to release.
            let p = self.permit.lock().unwrap_or_else(|e| e.into_inner()).take();
            std::mem::forget(p);
        }
    }
}

impl Lease {
    fn lost_reason(&self) -> Option<tc::LostReason> {
        lock(&self.permit).as_ref().and_then(|p| p.lost_reason())
    }
}

#[pymethods]
impl Lease {
    /// The lease id.
    #[getter]
    fn lease_id(&self) -> u64 {
        self.lease_id
    }

    /// The fencing token.
    #[getter]
    fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// The semaphore's name.
    #[getter]
    fn semaphore(&self) -> &str {
        &self.semaphore
    }

    /// The session id, as 16 hex digits.
    #[getter]
    fn session(&self) -> String {
        format!("{:016x}", self.session)
    }

    /// Why the lease was lost ("expired", "closed", "session ended", "unreachable"), or `None`.
    #[getter]
    fn lost(&self) -> Option<&'static str> {
        if self.pid != std::process::id() {
            return None;
        }
        self.lost_reason().map(lost_name)
    }

    /// Whether it is still held: neither released nor lost.
    #[getter]
    fn held(&self) -> bool {
        self.pid == std::process::id()
            && lock(&self.permit)
                .as_ref()
                .is_some_and(|p| p.lost_reason().is_none())
    }

    /// Releases the lease. `True` if it was held until now, `False` if it had been released
    /// or lost already (or belongs to another process), as far as this process knows: the
    /// release is sent without waiting for its answer ([`tc::Permit::send_release`]), so
    /// a loss the coordinator has not yet told of is not seen.
    fn release(&self, py: Python<'_>) -> PyResult<bool> {
        let Some(permit) = lock(&self.permit).take() else {
            return Ok(false);
        };
        if self.pid != std::process::id() {
            std::mem::forget(permit);
            return Ok(false);
        }
        if permit.lost_reason().is_some() {
            return Ok(false);
        }
        match block(py, &self.rt, permit.send_release())? {
            Ok(()) => Ok(true),
            Err(tc::Error::LeaseLost(_) | tc::Error::SessionLost) => Ok(false),
            Err(tc::Error::Rejected {
                code: tc::ErrorCode::UnknownLease | tc::ErrorCode::Closed,
                ..
            }) => Ok(false),
            Err(e) => Err(error(py, &e, &format!("Semaphore `{}`", self.semaphore))),
        }
    }

    /// Waits until the lease is lost, for at most `timeout` seconds: the reason, or `None` if
    /// it is still held (or was released).
    #[pyo3(signature = (timeout=None))]
    fn wait_lost(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<&'static str>> {
        let timeout = seconds("timeout", timeout)?;
        if self.pid != std::process::id() {
            // Another process's lease (inherited through fork): its runtime has no threads
            // here, and this process does not hold it.
            return Ok(None);
        }
        // `None` once released: nothing left to lose. The signal is pushed by the client as
        // it learns of a loss (no polling), and ends with `None` when the lease is released.
        let Some(signal) = lock(&self.permit).as_ref().map(|p| p.lost_signal()) else {
            return Ok(None);
        };
        let reason = block(py, &self.rt, async move {
            match timeout {
                None => signal.wait().await,
                Some(t) => tokio::time::timeout(t, signal.wait()).await.ok().flatten(),
            }
        })?;
        Ok(reason.map(lost_name))
    }

    /// Calls `callback(reason)` on the thread driving the runtime when the lease is lost (not when it is
    /// released).
    fn on_lost(&self, callback: Py<PyAny>) {
        if self.pid != std::process::id() {
            return; // another process's lease: see `wait_lost`
        }
        let Some(signal) = lock(&self.permit).as_ref().map(|p| p.lost_signal()) else {
            return; // released already
        };
        self.rt.spawn(async move {
            // `None`: released (or the client shut down) without a loss.
            let Some(reason) = signal.wait().await else {
                return;
            };
            Python::try_attach(|py| {
                if let Err(e) = callback.call1(py, (lost_name(reason),)) {
                    e.write_unraisable(py, None);
                }
            });
        });
    }
}

/// A run-once job attempt that holds the job's exclusive lease.
#[pyclass(frozen, module = "turnstile._native")]
struct JobAttempt {
    pid: u32,
    rt: Arc<Ctx>,
    job: String,
    fencing_token: u64,
    inner: Mutex<Option<tc::JobAttempt>>,
}

impl Drop for JobAttempt {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            let a = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
            std::mem::forget(a);
        }
    }
}

impl JobAttempt {
    fn check_process(&self) -> PyResult<()> {
        if self.pid == std::process::id() {
            return Ok(());
        }
        Err(PyRuntimeError::new_err(format!(
            "job `{}`: this attempt belongs to process {}, not to this one (a forked child)",
            self.job, self.pid
        )))
    }
}

#[pymethods]
impl JobAttempt {
    /// The job's name.
    #[getter]
    fn job(&self) -> &str {
        &self.job
    }

    /// The attempt's fencing token.
    #[getter]
    fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// Why the job's lease was lost, or `None`.
    #[getter]
    fn lost(&self) -> Option<&'static str> {
        if self.pid != std::process::id() {
            return None;
        }
        lock(&self.inner)
            .as_ref()
            .and_then(|a| a.permit().lost_reason())
            .map(lost_name)
    }

    /// Records the job's completion and releases its lease.
    fn succeed(&self, py: Python<'_>) -> PyResult<()> {
        self.check_process()?;
        let Some(a) = lock(&self.inner).take() else {
            return Err(PyRuntimeError::new_err(format!(
                "job `{}`: this attempt has already ended",
                self.job
            )));
        };
        block(py, &self.rt, a.succeed())?.map_err(|e| error(py, &e, &format!("job `{}`", self.job)))
    }

    /// Records a failed attempt (`reason` in words) and releases the lease.
    fn fail(&self, py: Python<'_>, reason: &str) -> PyResult<()> {
        self.check_process()?;
        let Some(a) = lock(&self.inner).take() else {
            return Ok(());
        };
        let reason = reason.to_owned();
        block(py, &self.rt, async move { a.fail(&reason).await })?
            .map_err(|e| error(py, &e, &format!("job `{}`", self.job)))
    }
}

fn unix_seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Starts an attempt at run-once job `job`: `("run", JobAttempt)`, `("completed", info)` or
/// (with `wait` false) `("running", info)`; `info` is a dict. `None` if `timeout` passed.
#[pyfunction]
#[pyo3(signature = (url, job, group=None, wait=true, timeout=None, session_ttl=None))]
fn begin_job(
    py: Python<'_>,
    url: &str,
    job: &str,
    group: Option<&str>,
    wait: bool,
    timeout: Option<f64>,
    session_ttl: Option<f64>,
) -> PyResult<Option<(&'static str, Py<PyAny>)>> {
    let timeout = seconds("timeout", timeout)?;
    let ttl_ms = seconds("session_ttl", session_ttl)?.map(|d| d.as_millis().max(1) as u64);
    let (rt, c) = client(py, url, ttl_ms)?;
    let (job_s, group_s) = (job.to_owned(), group.map(str::to_owned));
    let out = block(py, &rt, async move {
        let g = group_s.as_deref();
        match (wait, timeout) {
            (false, _) => c.try_begin_job(&job_s, g).await,
            (true, None) => c.begin_job(&job_s, g).await,
            (true, Some(t)) => c.begin_job_timeout(&job_s, g, t).await,
        }
    })?;
    let start = match out {
        Ok(s) => s,
        Err(tc::Error::TimedOut) => return Ok(None),
        Err(e) => return Err(error(py, &e, &format!("job `{job}`"))),
    };
    Ok(Some(match start {
        tc::JobStart::Run(a) => (
            "run",
            Py::new(
                py,
                JobAttempt {
                    pid: std::process::id(),
                    rt,
                    job: job.to_owned(),
                    fencing_token: a.fencing_token(),
                    inner: Mutex::new(Some(a)),
                },
            )?
            .into_any(),
        ),
        tc::JobStart::Completed(done) => {
            let d = pyo3::types::PyDict::new(py);
            d.set_item("client", done.client)?;
            d.set_item("fencing_token", done.token)?;
            d.set_item("started", unix_seconds(done.started))?;
            d.set_item("duration", done.duration.as_secs_f64())?;
            ("completed", d.into_any().unbind())
        }
        tc::JobStart::Running(r) => {
            let d = pyo3::types::PyDict::new(py);
            d.set_item("client", r.client)?;
            d.set_item("fencing_token", r.token)?;
            d.set_item("running_for", r.running_for.as_secs_f64())?;
            ("running", d.into_any().unbind())
        }
    }))
}

/// Waits until no job of `group` runs and at least `jobs` have completed: `(jobs, completed,
/// running, failures)`, or `None` if `timeout` passed.
#[pyfunction]
#[pyo3(signature = (url, group, jobs=0, timeout=None, session_ttl=None))]
fn wait_group(
    py: Python<'_>,
    url: &str,
    group: &str,
    jobs: u32,
    timeout: Option<f64>,
    session_ttl: Option<f64>,
) -> PyResult<Option<(u32, u32, u32, u64)>> {
    let timeout = seconds("timeout", timeout)?;
    let ttl_ms = seconds("session_ttl", session_ttl)?.map(|d| d.as_millis().max(1) as u64);
    let (rt, c) = client(py, url, ttl_ms)?;
    let g = group.to_owned();
    match block(
        py,
        &rt,
        async move { c.wait_group(&g, jobs, timeout).await },
    )? {
        Ok(s) => Ok(Some((s.jobs, s.completed, s.running, s.failures))),
        Err(tc::Error::TimedOut) => Ok(None),
        Err(e) => Err(error(py, &e, &format!("job group `{group}`"))),
    }
}

/// Forgets job `job`'s completion; whether it had completed.
#[pyfunction]
#[pyo3(signature = (url, job, session_ttl=None))]
fn reset_job(py: Python<'_>, url: &str, job: &str, session_ttl: Option<f64>) -> PyResult<bool> {
    let ttl_ms = seconds("session_ttl", session_ttl)?.map(|d| d.as_millis().max(1) as u64);
    let (rt, c) = client(py, url, ttl_ms)?;
    let j = job.to_owned();
    block(py, &rt, async move { c.reset_job(&j).await })?
        .map_err(|e| error(py, &e, &format!("job `{job}`")))
}

/// The URL used when none is given: `TURNSTILE_URL`, else the CLI's local default.
#[pyfunction]
fn default_url() -> String {
    std::env::var(tc::URL_ENV).unwrap_or_else(|_| tc::default_url())
}

/// Ends this process's sessions cleanly (their leases are released at once). Called at exit.
#[pyfunction]
fn shutdown(py: Python<'_>) -> PyResult<()> {
    let (rt, clients) = {
        let mut reg = lock(&REGISTRY);
        match reg.as_mut().filter(|r| r.pid == std::process::id()) {
            Some(r) => (r.rt.clone(), std::mem::take(&mut r.clients)),
            None => return Ok(()),
        }
    };
    let _ = block(py, &rt, async move {
        for c in clients.values() {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.shutdown()).await;
        }
    });
    Ok(())
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SemaphoreCore>()?;
    m.add_class::<PendingAcquire>()?;
    m.add_class::<Lease>()?;
    m.add_class::<JobAttempt>()?;
    m.add_function(wrap_pyfunction!(begin_job, m)?)?;
    m.add_function(wrap_pyfunction!(wait_group, m)?)?;
    m.add_function(wrap_pyfunction!(reset_job, m)?)?;
    m.add_function(wrap_pyfunction!(default_url, m)?)?;
    m.add_function(wrap_pyfunction!(shutdown, m)?)?;
    Ok(())
}
