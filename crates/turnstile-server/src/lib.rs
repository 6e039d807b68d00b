//! The turnstile coordinator: a tokio TCP server around the sans-IO core.
//!
//! The server owns no semantics. For each request it takes the state lock, hands the request
//! to [`turnstile_core::Coordinator`], and routes the effects that come back: replies to the
//! connection that asked (or that waits, for a queued acquire), lease-lost events to the
//! connection a session is bound to. A timer task sleeps until the core's next deadline and
//! ticks it. Connections are served by a reader task that decodes frames and a writer task
//! that sends everything buffered for the connection in one write.
//!
//! Entry point: [`run`], which takes a bound listener and a shutdown future so that tests can
//! bind port 0 and stop the server when they are done.
#![deny(missing_docs)]

mod conn;
mod outbox;
mod state;
mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::state::Shared;

/// Server settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// TTL of a session whose client does not ask for one.
    pub session_ttl: Duration,
    /// Shortest TTL a client may ask for.
    pub min_session_ttl: Duration,
    /// Longest TTL a client may ask for.
    pub max_session_ttl: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            session_ttl: Duration::from_secs(10),
            min_session_ttl: Duration::from_millis(100),
            max_session_ttl: Duration::from_secs(24 * 3600),
            max_connections: 16_384,
        }
    }
}

/// Why the server stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Accepting connections failed in a way that will not pass.
    #[error("accept failed: {0}")]
    Accept(#[source] std::io::Error),
}

/// Serves `listener` until `shutdown` completes, then closes every connection (each client is
/// told with a `ShuttingDown` error) and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let shared = Arc::new(Shared::new(config));
    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut tasks = JoinSet::new();
    tasks.spawn(timer_loop(shared.clone(), stop_rx.clone()));
    tokio::pin!(shutdown);
    let result = loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()), // the semaphore is never closed; treat as shutdown
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let shared = shared.clone();
                let stop = stop_rx.clone();
                tasks.spawn(async move {
                    conn::serve(shared, stream, stop).await;
                    drop(permit);
                });
            }
            Err(e) if is_transient(&e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => break Err(ServerError::Accept(e)),
        }
        // Reap finished connection tasks so the set does not grow with every connection.
        while tasks.try_join_next().is_some() {}
    };
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    result
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | OutOfMemory
    ) || e.raw_os_error().is_some_and(|c| c == 23 || c == 24) // ENFILE, EMFILE
}

/// Sleeps until the core's next deadline (or until woken for an earlier one) and ticks.
async fn timer_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let next = {
            let mut st = shared.lock();
            let next = st.core.next_deadline();
            st.timer_at = next;
            next
        };
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(shared.instant_of(t).into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => shared.tick(),
            _ = shared.timer.notified() => {}
            _ = stop.changed() => return,
        }
    }
}
