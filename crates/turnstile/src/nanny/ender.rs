//! Ending a dead worker's session at once, on a thread of its own: the supervisor's loop
//! never waits for the coordinator, which may be slow or gone.

use super::*;

/// Ends the sessions of dead workers on a task of its own, so that a slow or unreachable
/// backend never holds up the workers.
pub(super) struct SessionEnder {
    tx: mpsc::UnboundedSender<Ending>,
    task: tokio::task::JoinHandle<()>,
    reach: Arc<Mutex<Reach>>,
}

/// What the nanny knows of its backend, for `--death-timeout`.
#[derive(Default)]
pub(super) struct Reach {
    /// The nanny's client, while it has one: it knows how long the coordinator has been away.
    client: Option<Client>,
    /// Since when connecting has failed, while there is no client.
    down_since: Option<Instant>,
}

impl Reach {
    pub(super) fn connected(&mut self, client: Client) {
        self.client = Some(client);
        self.down_since = None;
    }

    /// A connection attempt failed: the backend counts as away since the earliest failure
    /// or the moment the last client lost it.
    pub(super) fn failed(&mut self, now: Instant) {
        let away = self
            .client
            .take()
            .and_then(|c| c.unreachable_for())
            .and_then(|d| now.checked_sub(d));
        let since = away.unwrap_or(now);
        self.down_since = Some(self.down_since.map_or(since, |t| t.min(since)));
    }
}

pub(super) fn lock(reach: &Mutex<Reach>) -> std::sync::MutexGuard<'_, Reach> {
    // Nothing panics while holding it; a poisoned lock still holds consistent data.
    reach
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) struct Ending {
    worker: usize,
    pid: i32,
    session: u64,
}

impl SessionEnder {
    pub(super) fn start(url: String) -> SessionEnder {
        let (tx, rx) = mpsc::unbounded_channel();
        let reach = Arc::new(Mutex::new(Reach::default()));
        let task = tokio::spawn(end_sessions(url, rx, reach.clone()));
        SessionEnder { tx, task, reach }
    }

    /// How long the backend has been unreachable; `None` while it answers (or until the
    /// first connection has been tried).
    pub(super) fn unreachable_for(&self) -> Option<Duration> {
        let reach = lock(&self.reach);
        match &reach.client {
            Some(c) => c.unreachable_for(),
            None => reach.down_since.map(|t| t.elapsed()),
        }
    }

    pub(super) fn end(&self, worker: usize, pid: i32, session: u64) {
        let _ = self.tx.send(Ending {
            worker,
            pid,
            session,
        });
    }

    /// Waits (boundedly) for the sessions still to be ended, then ends the nanny's own.
    pub(super) async fn finish(self) {
        drop(self.tx);
        if tokio::time::timeout(FLUSH_TIMEOUT, self.task)
            .await
            .is_err()
        {
            warn!("gave up waiting for the backend to end the workers' sessions");
        }
    }
}

pub(super) async fn end_sessions(
    url: String,
    mut rx: mpsc::UnboundedReceiver<Ending>,
    reach: Arc<Mutex<Reach>>,
) {
    // Connect before the first death, so that it is not paid for then; failure is retried
    // at the first death, and quietly every RECONNECT_EVERY.
    let mut client = match connect(&url).await {
        Ok(c) => {
            lock(&reach).connected(c.clone());
            Some(c)
        }
        Err(_) => {
            lock(&reach).failed(Instant::now());
            None
        }
    };
    loop {
        let job = tokio::select! {
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
            _ = tokio::time::sleep(RECONNECT_EVERY), if client.is_none() => {
                if let Ok(c) = connect(&url).await {
                    lock(&reach).connected(c.clone());
                    client = Some(c);
                }
                continue;
            }
        };
        let who = format!("worker {} (pid {})", job.worker, job.pid);
        let c = match &client {
            Some(c) => c.clone(),
            None => match connect(&url).await {
                Ok(c) => {
                    lock(&reach).connected(c.clone());
                    client.insert(c).clone()
                }
                Err(e) => {
                    lock(&reach).failed(Instant::now());
                    warn!("{who}: cannot end its session: {e:#}; its leases are freed when the session TTL passes");
                    continue;
                }
            },
        };
        match tokio::time::timeout(END_SESSION_TIMEOUT, c.end_session(job.session)).await {
            Ok(Ok(())) => debug!("{who}: ended session {:016x}", job.session),
            Ok(Err(e)) => {
                warn!(
                    "{who}: cannot end its session: {:#}; its leases are freed when the session TTL passes",
                    anyhow::Error::from(e)
                );
                // The client in `reach` still tells how long the backend has been away.
                client = None;
            }
            Err(_) => {
                warn!("{who}: the backend did not end its session within {}; its leases are freed when the session TTL passes", humantime::format_duration(END_SESSION_TIMEOUT));
                client = None;
            }
        }
    }
    if let Some(c) = client {
        // The nanny's session has an id of its own (see `connect`), which the client takes
        // for a session it was given and would leave to expire at shutdown: end it outright,
        // so that a nanny that exits cleanly is not reported as an expired session.
        let own = c.session_id();
        let _ = tokio::time::timeout(END_SESSION_TIMEOUT, c.end_session(own)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), c.shutdown()).await;
    }
}

/// The nanny's own client, with a session id of its own: never `TURNSTILE_SESSION`, which
/// belongs to whoever started the nanny.
pub(super) async fn connect(url: &str) -> anyhow::Result<Client> {
    let options = Options {
        session_id: Some(turnstile_client::new_session_id()),
        client_name: Some(format!("turnstile-nanny:{}", std::process::id())),
        ..Options::default()
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, Client::connect_with(url, options)).await {
        Ok(client) => Ok(client?),
        Err(_) => anyhow::bail!(
            "no answer from {url} within {}",
            humantime::format_duration(CONNECT_TIMEOUT)
        ),
    }
}
