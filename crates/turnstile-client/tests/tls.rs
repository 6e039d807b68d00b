//! The coordinator backend over TLS (`tls://`) against an in-process coordinator with the test
//! certificate (`crates/turnstile/tests/certs/`): the whole conformance suite, heavy pipelined
//! traffic and replies of many TLS records (what the TLS write path must flush whole), and the
//! refusals a retry cannot change.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use turnstile_client::{Client, Error, Options};
use turnstile_server::{Config, TlsIdentity};

mod conformance;
use conformance::Fixture;

conformance_suite!(tls, TlsServer::start().await);

fn cert(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../turnstile/tests/certs")
        .join(name)
}

/// An in-process coordinator serving TLS; stops when dropped.
struct TlsServer {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl TlsServer {
    async fn start() -> TlsServer {
        // Clients that the conformance suite makes with options of their own find the CA
        // through the environment, as a program would. Set once, before any client of this
        // binary connects (std serializes environment access).
        static CA_FROM_ENV: Once = Once::new();
        CA_FROM_ENV.call_once(|| std::env::set_var(turnstile_client::CA_ENV, cert("ca.pem")));
        let identity = TlsIdentity::from_pem_files(&cert("server.pem"), &cert("server.key"))
            .expect("the test certificate loads");
        let config = Config {
            tls: Some(identity),
            ..Config::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            turnstile_server::run(listener, config, shutdown)
                .await
                .expect("server runs");
        });
        TlsServer { addr, _stop: stop }
    }
}

impl Fixture for TlsServer {
    async fn client(&self) -> Client {
        let options = Options {
            ca: Some(cert("ca.pem")),
            ..Options::default()
        };
        Client::connect_with(&self.url(), options)
            .await
            .expect("connect over TLS")
    }

    fn url(&self) -> String {
        format!("tls://{}", self.addr)
    }
}

/// Many acquires in flight at once (the client writes them in bursts, the server answers in
/// batches) and a status reply far larger than one TLS record: every reply arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_traffic_and_large_replies_cross_tls_whole() {
    let server = TlsServer::start().await;
    let client = server.client().await;
    let sem = client.semaphore("pool", 8).await.expect("ensure");
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let permit = sem.acquire().await.expect("acquire");
                permit.release().await.expect("release");
            }
        }));
    }
    let all = async {
        for t in tasks {
            t.await.expect("task");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("2,000 pairs over TLS finish");
    // About 3,000 semaphores with long names: a status page of several hundred KiB.
    let long = "n".repeat(200);
    for i in 0..3_000 {
        client
            .semaphore(&format!("{long}-{i:05}"), 1)
            .await
            .expect("ensure");
    }
    let status = tokio::time::timeout(Duration::from_secs(60), client.status(None))
        .await
        .expect("the status arrives")
        .expect("status");
    assert!(
        status.semaphores.len() >= 1_000,
        "{}",
        status.semaphores.len()
    );
    client.shutdown().await.expect("shut down");
}

#[tokio::test]
async fn refusals_are_tls_errors_and_are_not_retried() {
    let server = TlsServer::start().await;
    let started = tokio::time::Instant::now();
    // A CA that did not sign the server's certificate, even with retries allowed.
    let options = Options {
        ca: Some(cert("other-ca.pem")),
        connect_timeout: Some(Duration::from_secs(30)),
        ..Options::default()
    };
    let e = Client::connect_with(&server.url(), options)
        .await
        .expect_err("an untrusted certificate is refused");
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(!e.is_unavailable(), "{e:?}");
    assert!(e.to_string().contains("not trusted"), "{e}");
    // Plain TCP on the TLS port.
    let plain = format!("tcp://{}", server.addr);
    let options = Options {
        connect_timeout: Some(Duration::from_secs(30)),
        ..Options::default()
    };
    let e = Client::connect_with(&plain, options)
        .await
        .expect_err("a plaintext client is refused");
    assert!(e.to_string().contains("tls://"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "retried: {:?}",
        started.elapsed()
    );
}
