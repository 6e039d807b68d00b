//! The workload and its judge: the scenario, the seeded choices, the client tasks that
//! acquire, hold and release (`Worker`), the task that kills and restarts the server
//! (`Driver`), and the check of the grant history (`check_tokens`).

use super::*;

pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) fsync: &'static str,
    /// `--snapshot-every`; `None` keeps the default (no snapshot in a test this size).
    pub(crate) snapshot_every: Option<&'static str>,
    pub(crate) rounds: u32,
}

pub(crate) fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// A tiny xorshift64 generator: reproducible scenarios without a dependency.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that close seeds give unrelated streams (and never 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)).max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `lo..=hi` (near enough).
    pub(crate) fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True one time in `n`.
    pub(crate) fn one_in(&mut self, n: u64) -> bool {
        self.range((1, n)) == 1
    }
}

/// A permit a client holds, as the clients and the server describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Held {
    /// Index in [`SEMAPHORES`].
    pub(crate) sem: usize,
    pub(crate) session: u64,
    pub(crate) lease: u64,
    pub(crate) token: u64,
}

/// An acknowledged grant.
pub(crate) struct GrantRecord {
    pub(crate) held: Held,
    /// When `acquire` was called: its lease id did not exist before.
    pub(crate) started: Instant,
    /// When `acquire` returned it.
    pub(crate) acked: Instant,
}

/// What the clients do: run, wait at a quiet point (numbered), or finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Run,
    Pause(u64),
    Stop,
}

/// A client's report that it is idle at quiet point `pause`, holding `held`.
pub(crate) struct Parked {
    pub(crate) client: usize,
    pub(crate) pause: u64,
    pub(crate) held: Option<Held>,
}

/// What the client tasks share with the test.
pub(crate) struct Shared {
    pub(crate) epoch: Instant,
    /// Per semaphore: permits the clients hold right now.
    pub(crate) holding: [AtomicU32; SEMAPHORES.len()],
    pub(crate) grants: Mutex<Vec<GrantRecord>>,
    /// (session, lease) of every release that returned `Ok`.
    pub(crate) released: Mutex<HashSet<(u64, u64)>>,
    pub(crate) pairs: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) failures: Mutex<Vec<String>>,
}

impl Shared {
    pub(crate) fn fail(&self, what: String) {
        let what = format!("[{:>7.3}s] {what}", self.epoch.elapsed().as_secs_f64());
        eprintln!("FAILURE {what}");
        lock(&self.failures).push(what);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One client task.
pub(crate) struct Worker {
    pub(crate) id: usize,
    pub(crate) client: Client,
    pub(crate) semaphores: Vec<Semaphore>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) phase: watch::Receiver<Phase>,
    pub(crate) parked: mpsc::UnboundedSender<Parked>,
    pub(crate) rng: Rng,
    /// The last quiet point this worker reported at.
    pub(crate) reported: u64,
}

impl Worker {
    pub(crate) async fn run(mut self) {
        loop {
            if !self.park(None).await {
                break;
            }
            let s = usize::from(self.rng.one_in(4));
            let (name, capacity) = SEMAPHORES[s];
            let started = Instant::now();
            let acquired = tokio::time::timeout(
                OP_DEADLINE,
                self.semaphores[s].acquire_timeout(ACQUIRE_TIMEOUT),
            )
            .await;
            let permit = match acquired {
                Ok(Ok(permit)) => permit,
                // A deadline that passes while the coordinator is down for a restart ends the
                // wait as "unreachable" (issue 19): a timeout all the same.
                Ok(Err(Error::TimedOut | Error::Unavailable { .. })) => {
                    self.shared.timeouts.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Ok(Err(e)) => {
                    self.fail(format!("acquire of {name} failed: {e} ({e:?})"));
                    continue;
                }
                Err(_) => {
                    self.fail(format!("acquire of {name} hung for {OP_DEADLINE:?}"));
                    continue;
                }
            };
            let acked = Instant::now();
            let now_holding = self.shared.holding[s].fetch_add(1, Ordering::SeqCst) + 1;
            if now_holding > capacity {
                self.fail(format!(
                    "{now_holding} permits of {name} (capacity {capacity}) held at once"
                ));
            }
            let held = Held {
                sem: s,
                session: permit.session_id(),
                lease: permit.lease_id(),
                token: permit.fencing_token(),
            };
            lock(&self.shared.grants).push(GrantRecord {
                held,
                started,
                acked,
            });
            let stop = self.hold(&permit, held).await;
            if let Some(reason) = permit.lost_reason() {
                self.fail(format!("lost {held:?}: {reason}"));
                self.shared.holding[s].fetch_sub(1, Ordering::SeqCst);
                // A lost permit is dropped without a release.
                if stop {
                    break;
                }
                continue;
            }
            // Not held any more as far as the count goes, before the server may give it away.
            self.shared.holding[s].fetch_sub(1, Ordering::SeqCst);
            // Odd clients do not wait for the release's answer (as the Python package does):
            // kills then also hit releases that only the client's re-send after the restart
            // can deliver, and invariant 2 must hold for them too.
            let release = async {
                if self.id % 2 == 1 {
                    permit.send_release().await
                } else {
                    permit.release().await
                }
            };
            match tokio::time::timeout(OP_DEADLINE, release).await {
                Ok(Ok(())) => {
                    lock(&self.shared.released).insert((held.session, held.lease));
                    self.shared.pairs.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => self.fail(format!("release of {held:?} failed: {e} ({e:?})")),
                Err(_) => self.fail(format!("release of {held:?} hung for {OP_DEADLINE:?}")),
            }
            if stop {
                break;
            }
        }
        if let Err(e) = self.client.shutdown().await {
            self.fail(format!("shutdown failed: {e}"));
        }
    }

    pub(crate) fn fail(&self, what: String) {
        self.shared.fail(format!("client {}: {what}", self.id));
    }

    /// Holds `permit` for a random time, parking at quiet points meanwhile. Returns whether
    /// the test said stop. Returns early if the permit is lost.
    pub(crate) async fn hold(&mut self, permit: &Permit, held: Held) -> bool {
        let ms = if self.id < LONG_HOLDERS && held.sem == 0 && self.rng.one_in(LONG_HOLD_ONE_IN) {
            self.rng.range(LONG_HOLD_MS)
        } else {
            self.rng.range(HOLD_MS)
        };
        let until = tokio::time::Instant::now() + Duration::from_millis(ms);
        loop {
            if matches!(
                *self.phase.borrow_and_update(),
                Phase::Pause(_) | Phase::Stop
            ) && !self.park(Some((held, permit))).await
            {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return false,
                _ = permit.lost() => return false,
                changed = self.phase.changed() => if changed.is_err() {
                    return true;
                },
            }
        }
    }

    /// Waits while the clients are paused. At each new quiet point it first talks to the
    /// server (so it is connected and its session resumed), then reports what it holds.
    /// Returns false when the test says stop.
    pub(crate) async fn park(&mut self, holding: Option<(Held, &Permit)>) -> bool {
        let mut lost_reported = false;
        loop {
            let phase = *self.phase.borrow_and_update();
            match phase {
                Phase::Run => return true,
                Phase::Stop => return false,
                Phase::Pause(id) if id != self.reported => {
                    self.reported = id;
                    match tokio::time::timeout(OP_DEADLINE, self.client.status(Some("crash"))).await
                    {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => self.fail(format!("status at quiet point {id}: {e}")),
                        Err(_) => self.fail(format!("status at quiet point {id} hung")),
                    }
                    let _ = self.parked.send(Parked {
                        client: self.id,
                        pause: id,
                        held: holding.map(|(held, _)| held),
                    });
                }
                Phase::Pause(_) => {}
            }
            let lost = async {
                match holding {
                    Some((held, permit)) if !lost_reported => (held, permit.lost().await),
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.phase.changed() => if changed.is_err() {
                    return false;
                },
                (held, reason) = lost => {
                    lost_reported = true;
                    self.fail(format!("lost {held:?} while parked: {reason}"));
                }
            }
        }
    }
}

/// The test's side: the server, the observer client, the clients' controls and the record
/// of what happened.
pub(crate) struct Driver {
    pub(crate) server: CrashServer,
    pub(crate) observer: Client,
    pub(crate) shared: Arc<Shared>,
    pub(crate) phase: watch::Sender<Phase>,
    pub(crate) parked: mpsc::UnboundedReceiver<Parked>,
    pub(crate) pause: u64,
    /// When each killed server was known dead.
    pub(crate) deaths: Vec<Instant>,
    /// Kill-to-listening times.
    pub(crate) downtimes: Vec<Duration>,
    /// Kills, restarts and quiet points, for failure messages.
    pub(crate) timeline: Vec<String>,
}

impl Driver {
    pub(crate) fn note(&mut self, what: String) {
        let line = format!(
            "[{:>7.3}s] {what}",
            self.shared.epoch.elapsed().as_secs_f64()
        );
        self.timeline.push(line);
    }

    /// Panics with the failures the clients recorded, if any, and the timeline.
    pub(crate) fn check_failures(&self, when: &str) {
        let failures = lock(&self.shared.failures);
        if !failures.is_empty() {
            panic!(
                "{} failure(s) by {when}:\n{}\n\ntimeline (last 30):\n{}\n\nserver log (tail):\n{}",
                failures.len(),
                failures.join("\n"),
                self.timeline[self.timeline.len().saturating_sub(30)..].join("\n"),
                log_tail(&self.server.log),
            );
        }
    }

    /// Kills the server and, after `outage`, starts it again on the same port and data
    /// directory.
    pub(crate) async fn crash_and_restart(&mut self, round: u32, quiet: bool, outage: Duration) {
        let killed = Instant::now();
        let dead = self.server.kill();
        self.deaths.push(dead);
        if !outage.is_zero() {
            // Part of the scenario: the server stays down for a while.
            tokio::time::sleep(outage).await;
        }
        self.server.start();
        let downtime = killed.elapsed();
        self.downtimes.push(downtime);
        let kind = if quiet { "quiet" } else { "busy" };
        self.note(format!(
            "kill {round} ({kind}, outage {outage:?}); back after {downtime:?}"
        ));
        assert!(
            downtime < MAX_DOWNTIME,
            "restart {round} took {downtime:?}: too slow to judge lease losses \
             (TTL {SESSION_TTL:?})"
        );
    }

    /// Pauses the clients, waits until they are all idle and connected, and checks the
    /// server's holders against theirs. Returns the holders. The clients stay paused.
    pub(crate) async fn quiet_point(&mut self, label: &str) -> BTreeSet<Held> {
        self.pause += 1;
        let id = self.pause;
        self.phase.send_replace(Phase::Pause(id));
        let deadline = tokio::time::Instant::now() + OP_DEADLINE + SOON;
        let mut reports: BTreeMap<usize, Option<Held>> = BTreeMap::new();
        while reports.len() < CLIENTS {
            match tokio::time::timeout_at(deadline, self.parked.recv()).await {
                Ok(Some(p)) if p.pause == id => {
                    reports.insert(p.client, p.held);
                }
                Ok(Some(_)) => {} // a report for an earlier quiet point
                Ok(None) => {
                    self.check_failures(label);
                    panic!("{label}: the client tasks are gone");
                }
                Err(_) => {
                    self.check_failures(label);
                    panic!(
                        "{label}: only clients {:?} of {CLIENTS} became idle",
                        reports.keys()
                    );
                }
            }
        }
        self.check_failures(label);
        self.note(format!("quiet point {id} ({label})"));

        let clients: BTreeSet<Held> = reports.values().flatten().copied().collect();
        // A release the coordinator answered before its record was written is lost with a
        // kill, and the lease is held again until the client's driver, resuming its session,
        // releases it again (ARCHITECTURE invariants 12 and 19): wait for that, not longer.
        let settle_by = tokio::time::Instant::now() + SOON;
        let server = loop {
            let doc: StatusDoc =
                match tokio::time::timeout(OP_DEADLINE, self.observer.status(None)).await {
                    Ok(Ok(doc)) => doc,
                    Ok(Err(e)) => panic!("{label}: status failed: {e}"),
                    Err(_) => panic!("{label}: status hung"),
                };
            let server = holders_on_server(&doc, label, &clients);
            let released_held = {
                let released = lock(&self.shared.released);
                server
                    .iter()
                    .any(|h| released.contains(&(h.session, h.lease)))
            };
            if !released_held || tokio::time::Instant::now() >= settle_by {
                break server;
            }
            eprintln!("{label}: a released lease is held again until its client resumes");
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        {
            let released = lock(&self.shared.released);
            let back: Vec<&Held> = server
                .iter()
                .filter(|h| released.contains(&(h.session, h.lease)))
                .collect();
            assert!(
                back.is_empty(),
                "{label}: released leases are held again: {back:?}"
            );
        }
        if server != clients {
            panic!(
                "{label}: the server's holders differ from what the clients hold\n\
                 only on the server: {:?}\nonly in the clients: {:?}\n\ntimeline (last 30):\n{}\n\n\
                 server log (tail):\n{}",
                server.difference(&clients).collect::<Vec<_>>(),
                clients.difference(&server).collect::<Vec<_>>(),
                self.timeline[self.timeline.len().saturating_sub(30)..].join("\n"),
                log_tail(&self.server.log),
            );
        }
        server
    }

    pub(crate) fn resume(&mut self) {
        self.phase.send_replace(Phase::Run);
    }

    /// Grants whose acquire started after the last kill, overall and per semaphore.
    pub(crate) fn grants_since_last_kill(&self) -> (usize, [usize; SEMAPHORES.len()]) {
        let last = self.deaths.last().copied();
        let grants = lock(&self.shared.grants);
        let mut per = [0; SEMAPHORES.len()];
        for g in grants.iter().filter(|g| last.is_none_or(|d| g.started > d)) {
            per[g.held.sem] += 1;
        }
        (per.iter().sum(), per)
    }
}

/// Checks invariant 3 on every acknowledged grant.
pub(crate) fn check_tokens(grants: &[GrantRecord], deaths: &[Instant]) {
    for (s, (name, _)) in SEMAPHORES.iter().enumerate() {
        let mine: Vec<&GrantRecord> = grants.iter().filter(|g| g.held.sem == s).collect();
        let mut seen = BTreeMap::new();
        for g in &mine {
            if let Some(other) = seen.insert(g.held.token, g.held) {
                panic!(
                    "{name}: token {} acknowledged twice: {other:?} and {:?}",
                    g.held.token, g.held
                );
            }
        }
        for (k, &dead) in deaths.iter().enumerate() {
            let before = mine
                .iter()
                .filter(|g| g.acked < dead)
                .map(|g| g.held.token)
                .max();
            let after = mine
                .iter()
                .filter(|g| g.started > dead)
                .map(|g| g.held.token)
                .min();
            if let (Some(before), Some(after)) = (before, after) {
                assert!(
                    after > before,
                    "{name}: after restart {}, a new grant got token {after}, but token {before} \
                     had been acknowledged before the crash",
                    k + 1
                );
            }
        }
    }
}

pub(crate) fn run(scenario: Scenario) {
    let seed = env_u64("TURNSTILE_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!(
        "crash test {}: {} rounds, seed {seed} (TURNSTILE_CRASH_SEED={seed} to repeat the choices)",
        scenario.name, scenario.rounds
    );
    let dir = Scratch::new(&format!("crash-{}", scenario.name));
    let mut server = CrashServer::new(&dir, &scenario);
    server.start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // The driver runs on this thread (block_on), so its blocking process handling stalls no
    // client task; the clients run on the runtime's workers.
    runtime.block_on(drive(&scenario, server, &dir, seed));
}

pub(crate) async fn drive(scenario: &Scenario, server: CrashServer, dir: &Scratch, seed: u64) {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let url = server.url();
    let options = || Options {
        session_ttl: Some(SESSION_TTL),
        ..Options::default()
    };
    let observer = Client::connect_with(&url, options())
        .await
        .expect("connect the observer");
    let shared = Arc::new(Shared {
        epoch: started,
        holding: Default::default(),
        grants: Mutex::new(Vec::new()),
        released: Mutex::new(HashSet::new()),
        pairs: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let (parked_tx, parked_rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        let client = Client::connect_with(&url, options())
            .await
            .expect("connect a client");
        let mut semaphores = Vec::new();
        for (name, capacity) in SEMAPHORES {
            semaphores.push(
                client
                    .semaphore(name, capacity)
                    .await
                    .expect("create the semaphore"),
            );
        }
        let worker = Worker {
            id,
            client,
            semaphores,
            shared: shared.clone(),
            phase: phase_rx.clone(),
            parked: parked_tx.clone(),
            rng: Rng::new(rng.next()),
            reported: 0,
        };
        tasks.push(tokio::spawn(worker.run()));
    }
    drop(parked_tx);
    let mut d = Driver {
        server,
        observer,
        shared: shared.clone(),
        phase: phase_tx,
        parked: parked_rx,
        pause: 0,
        deaths: Vec::new(),
        downtimes: Vec::new(),
        timeline: Vec::new(),
    };

    let (mut quiet_kills, mut outages) = (0, 0);
    for round in 1..=scenario.rounds {
        // The clients run for a random while; then a kill at whatever moment that is.
        tokio::time::sleep(Duration::from_millis(rng.range(RUN_MS))).await;
        let quiet = rng.one_in(4);
        let before = if quiet {
            quiet_kills += 1;
            Some(d.quiet_point(&format!("before kill {round}")).await)
        } else {
            None
        };
        let outage = if rng.one_in(OUTAGE_ONE_IN) {
            outages += 1;
            Duration::from_millis(rng.range(OUTAGE_MS))
        } else {
            Duration::ZERO
        };
        d.crash_and_restart(round, quiet, outage).await;
        let after = d.quiet_point(&format!("after restart {round}")).await;
        if let Some(before) = before {
            assert_eq!(
                before, after,
                "a kill with nothing in flight changed the holders (round {round})"
            );
        }
        d.resume();
    }

    // Progress after the last restart: wait for grants on every semaphore.
    let deadline = Instant::now() + SOON;
    loop {
        let (total, per) = d.grants_since_last_kill();
        if total >= 2 * CLIENTS && per.iter().all(|&n| n > 0) {
            break;
        }
        d.check_failures("the last run");
        assert!(
            Instant::now() < deadline,
            "only {total} grants ({per:?}) in {SOON:?} after the last restart"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    d.quiet_point("the end").await;

    // The clients release what they hold and close their sessions.
    d.phase.send_replace(Phase::Stop);
    for task in tasks {
        tokio::time::timeout(OP_DEADLINE, task)
            .await
            .expect("a client task finished")
            .expect("a client task did not panic");
    }
    d.check_failures("the clients' shutdown");
    let holders = |doc: &StatusDoc| -> Vec<String> {
        doc.semaphores
            .iter()
            .flat_map(|s| s.holders.iter().map(move |h| format!("{}: {h:?}", s.name)))
            .collect()
    };
    let doc = d.observer.status(None).await.expect("status");
    assert_eq!(holders(&doc), Vec::<String>::new(), "held after shutdown");
    // Closed sessions stay closed across a crash.
    d.crash_and_restart(scenario.rounds + 1, true, Duration::ZERO)
        .await;
    let doc = tokio::time::timeout(OP_DEADLINE, d.observer.status(None))
        .await
        .expect("status after the final restart hung")
        .expect("status after the final restart");
    assert_eq!(
        holders(&doc),
        Vec::<String>::new(),
        "held after the final restart"
    );
    assert_eq!(
        doc.semaphores.iter().map(|s| s.in_use).sum::<u32>(),
        0,
        "{doc:?}"
    );

    let grants = std::mem::take(&mut *lock(&shared.grants));
    check_tokens(&grants, &d.deaths);
    let pairs = shared.pairs.load(Ordering::Relaxed);
    let min_pairs = u64::from(scenario.rounds) * 3;
    assert!(
        pairs >= min_pairs,
        "only {pairs} acquire/release pairs in {} rounds (want {min_pairs})",
        scenario.rounds
    );
    if scenario.snapshot_every.is_some() {
        let snapshots = std::fs::read_dir(dir.join("data"))
            .expect("list the data directory")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
            .count();
        assert!(
            snapshots > 0,
            "no snapshot was taken: the test missed a path"
        );
    }
    let max_down = d.downtimes.iter().max().copied().unwrap_or_default();
    eprintln!(
        "crash test {}: {} kills ({quiet_kills} quiet, {outages} with an outage), \
         {pairs} acquire/release pairs, {} grants, {} acquire timeouts, longest restart \
         {max_down:?}, {:.1}s",
        scenario.name,
        d.deaths.len(),
        grants.len(),
        shared.timeouts.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    let _ = d.observer.shutdown().await;
}

/// The holders the coordinator's status document lists, checked against the semaphores'
/// capacities and what the clients believe they hold.
fn holders_on_server(doc: &StatusDoc, label: &str, clients: &BTreeSet<Held>) -> BTreeSet<Held> {
    let mut server = BTreeSet::new();
    for (s, (name, capacity)) in SEMAPHORES.iter().enumerate() {
        let sem = doc
            .semaphores
            .iter()
            .find(|x| x.name == *name)
            .unwrap_or_else(|| panic!("{label}: semaphore {name} is gone: {doc:?}"));
        assert_eq!(sem.capacity, *capacity, "{label}: {sem:?}");
        assert!(!sem.closed, "{label}: {sem:?}");
        assert!(
            sem.in_use <= *capacity,
            "{label}: {name} has {} permits in use, capacity {capacity}: {sem:?}",
            sem.in_use
        );
        let weights: u32 = sem.holders.iter().map(|h| h.weight).sum();
        assert_eq!(sem.in_use, weights, "{label}: in_use vs holders: {sem:?}");
        assert_eq!(
            sem.queued, 0,
            "{label}: {name} has queued acquires while no client waits: {sem:?}"
        );
        let believed = clients.iter().filter(|h| h.sem == s).count();
        assert!(
            believed <= *capacity as usize,
            "{label}: clients believe they hold {believed} permits of {name} \
                 (capacity {capacity})"
        );
        for h in &sem.holders {
            let session = u64::from_str_radix(&h.session, 16)
                .unwrap_or_else(|_| panic!("{label}: bad session {:?}", h.session));
            server.insert(Held {
                sem: s,
                session,
                lease: h.lease_id,
                token: h.token,
            });
        }
    }
    server
}
