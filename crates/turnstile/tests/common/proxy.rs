//! A TCP proxy on 127.0.0.1 that injects the faults of a network or a coordinator that goes
//! away: it forwards, then on command **cuts** every connection (both ends see it close; new
//! ones are forwarded), **blackholes** (connections stay open and nothing passes, ever: a
//! partition; new ones are accepted and held), **refuses** (its listener is closed and every
//! connection dropped: a coordinator that is down or restarting) and **goes away for good**.
//! `restore` forwards new connections again, to `set_upstream`'s address if it changed (a
//! coordinator restarted on another port stays reachable on the proxy's).
//!
//! With [`FaultProxy::chaos`] it also delays every chunk it forwards by a random time and drops
//! connections at random (the bytes in flight are lost and both ends see the close), from a
//! seeded xorshift generator per connection, so a failing run can be replayed from its seed.
//!
//! It runs on a tokio runtime of its own, on a thread of its own, so that both the CLI tests
//! (plain threads) and the library tests (inside their own runtime) can use it; dropping it
//! stops the thread and closes every socket. Shared by `crates/turnstile/tests/` and
//! `crates/turnstile-client/tests/client.rs` (through `#[path]`).
#![allow(dead_code)] // each test binary uses a part

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward new connections to the upstream.
    Forward,
    /// Hold every connection open and pass nothing.
    Blackhole,
    /// Listener closed, connections dropped.
    Refuse,
    /// Like `Refuse`, for good.
    Gone,
}

#[derive(Clone, Copy, Debug)]
struct State {
    mode: Mode,
    /// Bumped by `cut`: connections made before it close.
    cuts: u64,
    upstream: SocketAddr,
    /// Bumped by `stop` (drop): everything ends.
    stopped: bool,
    /// Random delays and drops for connections made from now on.
    chaos: Option<Chaos>,
}

/// Random faults on forwarded connections (see [`FaultProxy::chaos`]).
#[derive(Clone, Copy, Debug)]
pub struct Chaos {
    /// Seeds every connection's generator (with the connection's number).
    pub seed: u64,
    /// Each chunk waits a uniform random time below this before it is passed on.
    pub max_delay: Duration,
    /// Each chunk drops its connection with this probability, in thousandths.
    pub drop_per_mille: u32,
}

/// A xorshift64* generator: small, seeded, good enough to pick faults.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; zero is mapped away).
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The proxy. See the module doc.
pub struct FaultProxy {
    addr: SocketAddr,
    state: watch::Sender<State>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Connections accepted and forwarded upstream.
    forwarded: Arc<AtomicUsize>,
    /// Bytes passed from the server to clients.
    down_bytes: Arc<AtomicU64>,
    /// Bytes passed from clients to the server.
    up_bytes: Arc<AtomicU64>,
    /// Faults injected (cut, blackhole, refuse, gone), for the tests' report.
    faults: AtomicUsize,
    /// Connections dropped at random under [`FaultProxy::chaos`].
    drops: Arc<AtomicU64>,
    log: Mutex<Vec<&'static str>>,
}

impl FaultProxy {
    /// A proxy in `Forward` mode in front of `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        std_listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = std_listener.local_addr().expect("the proxy's address");
        let (state, rx) = watch::channel(State {
            mode: Mode::Forward,
            cuts: 0,
            upstream,
            stopped: false,
            chaos: None,
        });
        let forwarded = Arc::new(AtomicUsize::new(0));
        let down_bytes = Arc::new(AtomicU64::new(0));
        let up_bytes = Arc::new(AtomicU64::new(0));
        let drops = Arc::new(AtomicU64::new(0));
        let (f, d, u, x) = (
            forwarded.clone(),
            down_bytes.clone(),
            up_bytes.clone(),
            drops.clone(),
        );
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the proxy's runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("a tokio listener");
                serve(addr, Some(listener), rx, f, [d, u], x).await;
            });
            // Dropping the runtime drops every connection task and socket.
        });
        FaultProxy {
            addr,
            state,
            thread: Some(thread),
            forwarded,
            down_bytes,
            up_bytes,
            faults: AtomicUsize::new(0),
            drops,
            log: Mutex::new(Vec::new()),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `tcp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    fn set(&self, what: &'static str, f: impl FnOnce(&mut State)) {
        if !matches!(what, "restore" | "upstream" | "chaos") {
            self.faults.fetch_add(1, Ordering::SeqCst);
        }
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(what);
        self.state.send_modify(f);
    }

    /// Closes every open connection; new ones are forwarded as before.
    pub fn cut(&self) {
        self.set("cut", |s| s.cuts += 1);
    }

    /// From now on nothing passes on any connection, open or new, and nothing is closed.
    /// Connections blackholed stay so even after `restore`, as a TCP connection across a
    /// partition does until an end gives up on it.
    pub fn blackhole(&self) {
        self.set("blackhole", |s| s.mode = Mode::Blackhole);
    }

    /// Closes the listener (connection refused) and every connection.
    pub fn refuse(&self) {
        self.set("refuse", |s| s.mode = Mode::Refuse);
    }

    /// Like `refuse`, for good.
    pub fn gone(&self) {
        self.set("gone", |s| s.mode = Mode::Gone);
    }

    /// Forwards new connections again (not after `gone`).
    pub fn restore(&self) {
        self.set("restore", |s| {
            assert_ne!(
                s.mode,
                Mode::Gone,
                "a proxy that is gone does not come back"
            );
            s.mode = Mode::Forward;
        });
    }

    /// From now on, new connections get random delays and drops (`None`: no more).
    pub fn chaos(&self, chaos: Option<Chaos>) {
        self.set("chaos", |s| s.chaos = chaos);
    }

    /// Connections dropped at random so far.
    pub fn drops(&self) -> u64 {
        self.drops.load(Ordering::SeqCst)
    }

    /// Forwards new connections to `upstream` from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.set("upstream", |s| s.upstream = upstream);
    }

    /// Connections forwarded upstream so far.
    pub fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }

    /// Bytes passed from the server to clients so far.
    pub fn down_bytes(&self) -> u64 {
        self.down_bytes.load(Ordering::SeqCst)
    }

    /// Bytes passed from clients to the server so far.
    pub fn up_bytes(&self) -> u64 {
        self.up_bytes.load(Ordering::SeqCst)
    }

    /// Faults injected so far.
    pub fn faults(&self) -> usize {
        self.faults.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.send_modify(|s| s.stopped = true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    addr: SocketAddr,
    mut listener: Option<TcpListener>,
    mut rx: watch::Receiver<State>,
    forwarded: Arc<AtomicUsize>,
    bytes: [Arc<AtomicU64>; 2],
    drops: Arc<AtomicU64>,
) {
    let mut connections = 0u64;
    loop {
        let state = *rx.borrow_and_update();
        if state.stopped {
            return;
        }
        match state.mode {
            Mode::Refuse | Mode::Gone => listener = None,
            Mode::Forward | Mode::Blackhole if listener.is_none() => {
                listener = rebind(addr).await;
            }
            _ => {}
        }
        let accepted = async {
            match &listener {
                Some(l) => l.accept().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            conn = accepted => {
                if let Some((down, _)) = conn {
                    connections += 1;
                    let chaos = state.chaos.map(|c| (c, Rng::new(c.seed ^ connections.wrapping_mul(0x100_0000_01B3)), drops.clone()));
                    tokio::spawn(connection(down, rx.clone(), forwarded.clone(), bytes.clone(), chaos));
                }
            }
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// Binds the proxy's port again after `refuse` (the listener sets SO_REUSEADDR; a moment may
/// still pass before the port is free).
async fn rebind(addr: SocketAddr) -> Option<TcpListener> {
    for _ in 0..200 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return Some(l);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

async fn connection(
    mut down: TcpStream,
    mut rx: watch::Receiver<State>,
    forwarded: Arc<AtomicUsize>,
    bytes: [Arc<AtomicU64>; 2],
    mut chaos: Option<(Chaos, Rng, Arc<AtomicU64>)>,
) {
    let born = *rx.borrow_and_update();
    let mut up: Option<TcpStream> = None;
    let mut black = born.mode == Mode::Blackhole;
    loop {
        let now = *rx.borrow_and_update();
        if now.stopped || now.cuts != born.cuts || matches!(now.mode, Mode::Refuse | Mode::Gone) {
            return; // both sockets close
        }
        black |= now.mode == Mode::Blackhole;
        if black {
            // Hold both ends open and pass nothing, until the connection is to close.
            let _ = rx
                .wait_for(|s| {
                    s.stopped || s.cuts != born.cuts || matches!(s.mode, Mode::Refuse | Mode::Gone)
                })
                .await;
            return;
        }
        if up.is_none() {
            match TcpStream::connect(born.upstream).await {
                Ok(s) => {
                    forwarded.fetch_add(1, Ordering::SeqCst);
                    up = Some(s);
                }
                Err(_) => return,
            }
        }
        let Some(u) = up.as_mut() else { return };
        // Only a change that ends forwarding on this connection interrupts the copy (which
        // loses what was in flight): a new upstream is for new connections.
        tokio::select! {
            _ = pump(&mut down, u, &bytes, &mut chaos) => return,
            changed = rx.wait_for(|s| s.stopped || s.cuts != born.cuts || s.mode != Mode::Forward) => {
                if changed.is_err() { return }
            }
        }
    }
}

/// Copies both ways until either end closes. Bytes in flight when it is cancelled are lost,
/// which is what a partition does to them.
async fn pump(
    down: &mut TcpStream,
    up: &mut TcpStream,
    [down_bytes, up_bytes]: &[Arc<AtomicU64>; 2],
    chaos: &mut Option<(Chaos, Rng, Arc<AtomicU64>)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Whether to drop the connection instead of passing a chunk on; before passing it, waits
    // a random delay (both directions wait: one task pumps both).
    async fn fault(chaos: &mut Option<(Chaos, Rng, Arc<AtomicU64>)>) -> bool {
        let Some((c, rng, drops)) = chaos else {
            return false;
        };
        if rng.below(1000) < u64::from(c.drop_per_mille) {
            drops.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        let max = u64::try_from(c.max_delay.as_micros()).unwrap_or(u64::MAX);
        if max > 0 {
            tokio::time::sleep(Duration::from_micros(rng.below(max))).await;
        }
        false
    }
    let (mut dr, mut dw) = down.split();
    let (mut ur, mut uw) = up.split();
    let mut a = vec![0u8; 16 * 1024];
    let mut b = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = dr.read(&mut a) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if fault(chaos).await || uw.write_all(&a[..n]).await.is_err() { return }
                    up_bytes.fetch_add(n as u64, Ordering::SeqCst);
                }
            },
            n = ur.read(&mut b) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if fault(chaos).await || dw.write_all(&b[..n]).await.is_err() { return }
                    down_bytes.fetch_add(n as u64, Ordering::SeqCst);
                }
            },
        }
    }
}
