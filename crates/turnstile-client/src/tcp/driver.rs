//! The driver task: owns the link, numbers requests and matches their answers, keeps the
//! session alive, and reconnects and re-sends when the link breaks (see the module doc of
//! `tcp`).

use super::link::{open_link, write_rest, Hello, Opened};
use super::wire::{encode, owned, result_of, OwnedReply};
use super::writer::{Book, Own};
use super::*;

pub(super) struct Driver {
    pub(super) addr: String,
    /// Over TLS when set.
    pub(super) tls: Option<tls::Connector>,
    pub(super) name: String,
    /// The token presented in every `Hello` (empty: none).
    pub(super) token: String,
    /// The coordinator refused the handshake (a token it does not accept, a version it does
    /// not speak): retrying cannot help, so every call fails with this from then on.
    pub(super) refused: Option<(ErrorCode, String)>,
    pub(super) ttl_ms: u32,
    pub(super) session: Arc<AtomicU64>,
    pub(super) ttl: Duration,
    pub(super) rx: mpsc::UnboundedReceiver<Cmd>,
    /// Whether there is a link (its read side is in `shared.inbox`, its write half in
    /// `shared`'s writer).
    pub(super) linked: bool,
    /// The link's two sides, the ids, and the requests callers wrote themselves (see
    /// `writer` and `reader`).
    pub(super) shared: Arc<Shared>,
    /// Unanswered requests, by request id. A hash map rather than an ordered one: answers
    /// come mostly in order, and taking the first entry of a B-tree node shifts every other
    /// entry of it (about 5% of the client's CPU with 64 callers on one client); a re-send
    /// after a reconnect sorts the ids instead (see [`resend_order`]).
    pub(super) pending: Map<u32, Pending>,
    /// Held leases, to tell when they are lost.
    pub(super) leases: Map<u64, LostSender>,
    /// Leases given up because the coordinator was unreachable for a TTL. If the session
    /// turns out to be alive after all, they are released on reconnect, so that they do not
    /// stay held until the session ends.
    pub(super) abandoned: Vec<u64>,
    /// When the last request that the coordinator answered was *sent*: the session is alive
    /// until at least this plus the TTL, and no longer can the client count on it.
    pub(super) last_contact: Instant,
    pub(super) last_keepalive: Instant,
    pub(super) backoff: Duration,
    pub(super) next_attempt: Instant,
    /// The session was given to us (and may be shared): shutting down releases our leases
    /// and withdraws our waits, but does not close the session. Cleared when the session is
    /// lost and replaced by one of our own.
    pub(super) borrowed: bool,
    /// What callers see of the link (see [`Health`]).
    pub(super) health: Arc<Health>,
    /// A connection attempt under way, beside the loop, so that commands (a shutdown) are
    /// still served while it connects.
    pub(super) connecting: Option<Connecting>,
    /// When a keep-alive went out with nothing heard from the coordinator since: a link on
    /// which that lasts [`Driver::silence_limit`] is dead (the peer is gone, or a network
    /// drops everything), and is re-made.
    pub(super) awaiting_since: Option<Instant>,
    /// The "still trying" line, while the coordinator is away.
    pub(super) notice: Option<Notice>,
    /// The frames queued in this turn of the loop, written together at its end.
    pub(super) out: Vec<u8>,
    /// When this turn of the loop began: the send time of the requests it queues.
    pub(super) now: Instant,
    /// Callers of `send_release` whose releases this turn queued: told after its write.
    pub(super) sent: Vec<oneshot::Sender<()>>,
    /// Spare room for the book taken from `shared`.
    pub(super) book: Book,
    /// Callers left frames in the shared buffer (they woke us with `Cmd::Flush`), or a
    /// reconnect put its re-sends there: the turn's flush looks at it. Otherwise a flush with
    /// nothing of the driver's own skips the lock.
    pub(super) flush_shared: bool,
    /// Callers' calls answered by the frames being handled (see `Shared::crowd`).
    pub(super) answered: usize,
    /// Some pending call may wait for [`Until::LeaseGone`]: the timer then wakes the loop
    /// when the session's leases have surely expired, to fail those calls. Cleared when a
    /// look finds none left.
    pub(super) gone_pending: bool,
}

/// Pending request ids in the order they were first sent, oldest first: counted back from
/// the next id to be given, so that the order holds across the wrap of the ids too.
pub(super) fn resend_order(mut ids: Vec<u32>, next_id: u32) -> Vec<u32> {
    ids.sort_unstable_by_key(|id| id.wrapping_sub(next_id));
    ids
}

/// A connection attempt that runs beside the driver's loop.
pub(super) struct Connecting {
    attempt: BoxFuture<'static, Opened>,
    started: Instant,
    /// The new session this attempt opens, if it does not resume the current one.
    fresh: Option<u64>,
}

/// Runs the connection attempt, if there is one; pending forever otherwise, so that it can
/// sit in a `select!` arm. The caller takes the attempt out once it has finished.
pub(super) async fn attempt_done(c: &mut Option<Connecting>) -> (Opened, Instant, Option<u64>) {
    match c {
        Some(c) => ((&mut c.attempt).await, c.started, c.fresh),
        None => std::future::pending().await,
    }
}

impl Driver {
    pub(super) async fn run(mut self) {
        // Events the handshake carried (see `open_link`) are handled before anything is read.
        self.on_frames();
        // One timer for every deadline of the loop (keep-alive, silence, reconnect, notice,
        // presumed loss), armed at the earliest and re-armed only when that moves earlier or
        // it fires: a turn that handles requests touches no timer. Firing early is harmless,
        // because `on_timer` looks at what is actually due.
        let mut armed = self.next_wake();
        let timer = tokio::time::sleep_until(armed);
        tokio::pin!(timer);
        let shared = Arc::clone(&self.shared);
        // Set by a turn of the timer: the next read takes the readiness back from a caller.
        let mut take_back = false;
        loop {
            let mut fired = false;
            // A reading caller keeps the readiness while no request of ours waits for an
            // answer (see `reader`).
            let defer = self.pending.is_empty() && !std::mem::take(&mut take_back);
            // Biased: a fixed order costs no random number per turn. The timer comes last
            // and could lose to busy branches, so a turn also checks its deadline itself
            // (below).
            tokio::select! {
                biased;
                r = std::future::poll_fn(|cx| shared.poll_driver_read(cx, defer)) => {
                    self.now = Instant::now();
                    match r {
                        Ok(()) => {
                            self.heard();
                            self.on_frames();
                        }
                        Err(why) => self.disconnected(&why),
                    }
                }
                cmd = self.rx.recv() => {
                    if matches!(cmd, Some(Cmd::Flush { sent: None }))
                        && self.shared.try_lock().is_some_and(|w| w.out.is_empty())
                        && Instant::now() < armed
                    {
                        // A dropped permit's release that its caller's next request already
                        // took along: nothing to write, and nothing else is due.
                        continue;
                    }
                    if !self.pending.is_empty()
                        || self.shared.waiting.load(Ordering::Relaxed) > 1
                    {
                        // Other callers have requests in flight (or on their way here, still
                        // counted only in `waiting`): those whose answers just came are about
                        // to send their next ones. Let them run first, so that one write
                        // carries them all (see ARCHITECTURE invariant 25).
                        tokio::task::yield_now().await;
                    }
                    self.now = Instant::now();
                    let mut next = cmd;
                    // Every command already queued goes out in the same write.
                    loop {
                        match next {
                            Some(Cmd::Shutdown { reply }) => {
                                self.take_written();
                                self.flush().await;
                                self.close_session().await;
                                self.close_writer();
                                let _ = reply.send(());
                                return;
                            }
                            Some(cmd) => self.on_cmd(cmd),
                            None => {
                                // Every handle is gone: end the session so its leases free
                                // at once.
                                self.take_written();
                                self.flush().await;
                                self.close_session().await;
                                self.close_writer();
                                return;
                            }
                        }
                        next = match self.rx.try_recv() {
                            Ok(cmd) => Some(cmd),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => None,
                        };
                    }
                }
                (opened, started, fresh) = attempt_done(&mut self.connecting) => {
                    self.now = Instant::now();
                    self.connecting = None;
                    self.on_attempt(opened, started, fresh);
                }
                () = &mut timer => {
                    self.now = Instant::now();
                    fired = true;
                    self.take_written();
                    self.on_timer();
                }
            }
            if !fired && self.now >= armed {
                fired = true;
                self.take_written();
                self.on_timer();
            }
            self.flush().await;
            for sent in self.sent.drain(..) {
                let _ = sent.send(());
            }
            let at = self.next_wake();
            if at < armed || fired {
                armed = at;
                timer.as_mut().reset(at);
            }
            take_back |= fired;
        }
    }

    /// The earliest deadline the loop has to act on (see `on_timer`).
    fn next_wake(&self) -> Instant {
        let mut at = self.last_keepalive + FAR;
        if self.linked {
            at = at.min(self.last_keepalive + self.ttl / 3);
            if let Some(since) = self.awaiting_since {
                at = at.min(since + self.silence_limit());
            }
        } else if self.connecting.is_none() && self.refused.is_none() {
            at = at.min(self.next_attempt);
        }
        if let Some(notice) = &self.notice {
            at = at.min(notice.due());
        }
        if !self.leases.is_empty() {
            at = at.min(self.presumed_lost_at());
        }
        if self.gone_pending {
            at = at.min(self.health.lease_gone_at());
        }
        at
    }

    /// Give up a little before the coordinator may: clocks on two machines run at slightly
    /// different rates, and our timer fires a little late under load.
    fn presumed_lost_at(&self) -> Instant {
        self.last_contact + self.ttl - self.ttl / SAFETY_DIVISOR
    }

    /// The loop's timer fired: does what is due.
    fn on_timer(&mut self) {
        // What callers that read answers told `Health` (see `reader`): the deadlines below
        // are judged by it. Only here: the driver's own marks, behind it between two turns
        // of the timer, only make the timer fire early.
        let contact = self
            .health
            .at(self.health.last_contact.load(Ordering::Relaxed));
        self.last_contact = self.last_contact.max(contact);
        if let Some(since) = self.awaiting_since {
            if self.health.last_heard.load(Ordering::Relaxed) >= self.health.ms(since) {
                self.awaiting_since = None;
            }
        }
        let now = self.now;
        if self.linked {
            if let Some(since) = self.awaiting_since {
                let limit = self.silence_limit();
                if now >= since + limit {
                    self.disconnected(&format!("no answer for {limit:?}"));
                }
            }
        }
        if self.linked && now >= self.last_keepalive + self.ttl / 3 {
            self.last_keepalive = now;
            self.awaiting_since.get_or_insert(now);
            self.submit(Req::KeepAlive, None, None, false);
        }
        if !self.linked
            && self.connecting.is_none()
            && self.refused.is_none()
            && now >= self.next_attempt
        {
            self.reconnect(None);
        }
        if let Some(notice) = &mut self.notice {
            if now >= notice.due() {
                notice.show(&self.addr, now);
            }
        }
        if self.gone_pending && now >= self.health.lease_gone_at() {
            self.fail_gone();
        }
        if !self.leases.is_empty() && now >= self.presumed_lost_at() {
            // Each permit's `lost` says so; `turnstile run` prints it in its own words.
            tracing::debug!("no answer from the coordinator for a whole TTL; leases presumed lost");
            self.abandoned.extend(self.leases.keys().copied());
            self.lose_all(LostReason::Unreachable);
            // Push the contact mark forward so this does not fire again at once.
            self.last_contact = now;
        }
    }

    /// The session's leases have surely expired on the coordinator (its last contact plus
    /// the TTL passed): the calls that wait only that long (releases, a job's end) fail with
    /// `Unavailable`, and the lease is free anyway. Their requests stay pending, so that
    /// a link made later still sends them (a session that turns out alive frees the lease at
    /// once rather than at its end).
    fn fail_gone(&mut self) {
        let silent_for = self.health.silent_for(self.now);
        for p in self.pending.values_mut() {
            if !p.until_gone {
                continue;
            }
            match p.reply.take() {
                Some(reply) if !reply.is_closed() => {
                    let _ = reply.send(Err(Error::Unavailable {
                        addr: self.addr.clone(),
                        silent_for,
                    }));
                }
                _ => {}
            }
            p.until_gone = false;
        }
        self.gone_pending = false;
    }

    /// The error every call gets once the coordinator refused the handshake.
    fn refusal(&self) -> Error {
        let (code, message) = self.refused.clone().unwrap_or((
            ErrorCode::Handshake,
            "the coordinator refused the handshake".into(),
        ));
        Error::Rejected { code, message }
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Call(own) if self.refused.is_some() => {
                self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
                if let Some(reply) = own.reply {
                    let _ = reply.send(Err(self.refusal()));
                }
            }
            Cmd::Call(Own {
                req,
                reply,
                lost,
                until_gone,
            }) => {
                self.no_loss_after(&req);
                self.submit_counted(req, reply, lost, until_gone, true)
            }
            Cmd::Flush { sent } => {
                self.flush_shared = true;
                if let Some(sent) = sent {
                    self.sent.push(sent);
                }
            }
            Cmd::Forget { lease, sent } => {
                self.leases.remove(&lease);
                self.submit(Req::Release { lease }, None, None, false);
                if let Some(sent) = sent {
                    self.sent.push(sent);
                }
            }
            Cmd::Probe => {
                if self.linked {
                    self.awaiting_since.get_or_insert(self.now);
                    self.submit(Req::KeepAlive, None, None, false);
                }
            }
            Cmd::Shutdown { .. } => {}
            #[cfg(test)]
            Cmd::Watched { reply } => {
                self.take_written();
                let _ = reply.send(self.leases.len());
            }
        }
    }

    /// A release or a job's end: the coordinator releases the lease as it records the end
    /// or handles the release; from here no loss is to be reported for it (and a released
    /// lease must not stay in the map, which would grow with every pair).
    fn no_loss_after(&mut self, req: &Req) {
        if let Req::FinishJob { lease, .. } | Req::Release { lease } = req {
            self.leases.remove(lease);
        }
    }

    /// Takes the records of the requests callers wrote themselves: pending from here. Done
    /// where the records are needed, not on every turn: before the answers read are handled
    /// (`on_frames`), before the timer's work (a release's "lease surely gone" deadline is
    /// armed from its record; the presumed-loss deadline of the lease it releases, always
    /// earlier, brings the timer there), and before a reconnect, a disconnection or the end.
    fn take_written(&mut self) {
        // The driver's book, emptied each time, keeps its room for the next.
        let mut book = std::mem::take(&mut self.book);
        if !self.shared.take_book(&mut book) {
            self.book = book;
            return;
        }
        // Grants first: a record here may release one of them. Then the releases callers
        // read, of leases granted before the driver's last take.
        for (lease, lost) in book.granted.drain(..) {
            self.leases.insert(lease, lost);
        }
        for (id, p) in book.records.drain(..) {
            self.no_loss_after(&p.req);
            self.gone_pending |= p.until_gone;
            self.pending.insert(id, p);
        }
        for lease in book.released.drain(..) {
            self.leases.remove(&lease);
        }
        self.book = book;
    }

    /// A pending request leaves: a counted one no longer keeps callers from writing their
    /// own (see [`Shared::waiting`]).
    fn uncount(&self, p: &Pending) {
        if p.counted {
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The driver stops: no caller may write any more (with nobody to read the answer),
    /// and those that did are told by their dropped reply.
    fn close_writer(&mut self) {
        {
            let mut w = self.shared.lock();
            w.wr = None;
            w.out.clear();
        }
        // Nor reads: a caller waiting as the reader has only its channel left, which fails
        // below.
        self.shared.drop_link();
        self.linked = false;
        // After the write half is gone nobody records any more (see `Shared::book`); the
        // records' replies are dropped with them, which fails their callers.
        self.shared.take_book(&mut Book::default());
    }

    /// Records a request of the driver's own as pending (see [`Driver::submit_counted`]).
    fn submit(
        &mut self,
        req: Req,
        reply: Option<Reply>,
        lost: Option<LostSender>,
        until_gone: bool,
    ) {
        self.submit_counted(req, reply, lost, until_gone, false);
    }

    /// Records a request as pending and queues it for the turn's write if connected;
    /// otherwise it goes out after the next reconnect. `counted`: a caller's call, counted
    /// in [`Shared::waiting`].
    fn submit_counted(
        &mut self,
        req: Req,
        reply: Option<Reply>,
        lost: Option<LostSender>,
        until_gone: bool,
        counted: bool,
    ) {
        let id = self.shared.take_id();
        // Encoded straight into the write buffer: no buffer of its own per request.
        let mark = self.out.len();
        encode(id, &req, &mut self.out);
        let size = (self.out.len() - mark).saturating_sub(4);
        if !self.linked {
            // Sent with every other pending request once a link is made.
            self.out.truncate(mark);
        }
        if size > proto::MAX_REQUEST_FRAME {
            // The coordinator would refuse it and close the connection, and every reconnect
            // would send it again: fail the call here instead.
            self.out.truncate(mark);
            let message = format!(
                "the request is {size} bytes, over the coordinator's limit of {} (a name or \
                 reason too long?)",
                proto::MAX_REQUEST_FRAME
            );
            if counted {
                self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(reply) = reply {
                let _ = reply.send(Err(Error::Rejected {
                    code: ErrorCode::TooLarge,
                    message,
                }));
            }
            return;
        }
        self.pending.insert(
            id,
            Pending {
                req,
                reply,
                lost,
                // The start of the turn: no later than the send, as the contact mark needs.
                sent_at: self.now,
                resent: false,
                until_gone,
                counted,
            },
        );
        self.gone_pending |= until_gone;
    }

    /// Writes what the turn queued, behind what callers left in the shared buffer, in one
    /// go.
    async fn flush(&mut self) {
        if !self.linked {
            self.out.clear();
            return;
        }
        let (mut wr, rest) = {
            let mut w = if self.out.is_empty() {
                // Only what callers left, which they wake us for (or a reconnect's re-sends).
                if !std::mem::take(&mut self.flush_shared) {
                    return;
                }
                // A caller holding the lock writes it, or wakes us again.
                match self.shared.try_lock() {
                    Some(w) => w,
                    None => return,
                }
            } else {
                self.shared.lock()
            };
            if self.out.is_empty() && w.out.is_empty() {
                return;
            }
            if w.out.is_empty() {
                std::mem::swap(&mut w.out, &mut self.out);
            } else {
                w.out.extend_from_slice(&self.out);
                self.out.clear();
            }
            let Some(wr) = w.wr.as_ref() else {
                // Cannot be: the write half is only away during this function's own wait.
                w.out.clear();
                return;
            };
            #[cfg(test)]
            self.health.writes.fetch_add(1, Ordering::Relaxed);
            // The socket almost always takes it all at once; only a full send buffer waits,
            // bounded so that a peer that stopped reading cannot stall the loop.
            let n = match wr.try_write(&w.out) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    w.out.clear();
                    drop(w);
                    return self.disconnected(&format!("write failed: {e}"));
                }
            };
            if n == w.out.len() {
                w.out.clear();
                if w.out.capacity() > OUT_KEEP {
                    // A large re-send after a reconnect: do not keep its memory for ever.
                    w.out.shrink_to(OUT_KEEP);
                }
                return;
            }
            w.out.drain(..n);
            // The wait is ours: callers go through us meanwhile (see `writer`).
            let wr = w.wr.take();
            (wr, std::mem::take(&mut w.out))
        };
        let Some(wr_half) = wr.as_mut() else { return };
        let result = write_rest(wr_half, &rest).await;
        {
            let mut w = self.shared.lock();
            w.wr = wr;
            // Nothing was put in `out` meanwhile (no caller writes without the write half),
            // so its room is given back for the next turn.
            if w.out.is_empty() {
                w.out = rest;
                w.out.clear();
                if w.out.capacity() > OUT_KEEP {
                    w.out.shrink_to(OUT_KEEP);
                }
            }
        }
        if let Err(why) = result {
            self.disconnected(&why);
        }
    }

    /// How long a keep-alive may go unanswered before the link counts as dead: long enough
    /// for a loaded coordinator, short enough to re-make the link well within the TTL.
    fn silence_limit(&self) -> Duration {
        (self.ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(10))
    }

    /// Bytes came from the coordinator.
    fn heard(&mut self) {
        self.awaiting_since = None;
        self.health.heard(self.now);
    }

    /// Moves the contact mark (see `last_contact`), for callers too.
    fn contact(&mut self, at: Instant) {
        self.last_contact = at;
        self.health.contact(at);
    }

    fn disconnected(&mut self, why: &str) {
        // Whatever was queued for the dead link goes out again with the other pending
        // requests after the reconnect; callers write no more on it.
        self.out.clear();
        {
            let mut w = self.shared.lock();
            w.wr = None;
            w.out.clear();
        }
        self.take_written();
        let had_link = self.shared.drop_link();
        self.linked = false;
        if had_link {
            // Quiet: a restart of the coordinator must stay invisible. The notice says so if
            // the coordinator stays away.
            tracing::debug!(addr = %self.addr, why, "lost the connection to the coordinator; reconnecting");
            self.backoff = MIN_BACKOFF;
            self.next_attempt = Instant::now();
            self.awaiting_since = None;
            self.health.connected.store(false, Ordering::Relaxed);
            let heard = self.health.last_heard.load(Ordering::Relaxed);
            let _ = self.health.away_since.compare_exchange(
                NEVER,
                heard,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            if self.notice.is_none() {
                self.notice = Some(Notice::resuming(self.health.at(heard)));
            }
        }
    }

    /// Starts a connection attempt beside the loop: resuming the session, or opening the
    /// `fresh` one.
    fn reconnect(&mut self, fresh: Option<u64>) {
        // The coordinator refreshes the session when the resume arrives, which is after this.
        let started = Instant::now();
        let hello = match fresh {
            Some(session) => Hello::Open {
                session,
                ttl_ms: self.ttl_ms,
            },
            None => Hello::Resume {
                session: self.session.load(Ordering::Relaxed),
            },
        };
        let limit = (self.ttl / 2).clamp(Duration::from_millis(500), CONNECT_TIMEOUT);
        self.connecting = Some(Connecting {
            attempt: Box::pin(open_link(
                self.addr.clone(),
                self.tls.clone(),
                self.name.clone(),
                self.token.clone(),
                hello,
                started + limit,
            )),
            started,
            fresh,
        });
    }

    /// A connection attempt finished.
    fn on_attempt(&mut self, opened: Opened, attempt_started: Instant, fresh: Option<u64>) {
        let opened = match opened {
            Ok(Ok(ok)) => {
                if let Some(fresh) = fresh {
                    self.session.store(fresh, Ordering::Relaxed);
                    self.borrowed = false;
                }
                Some(ok)
            }
            Ok(Err(e)) if fresh.is_none() && e.code() == Some(ErrorCode::SessionNotFound) => {
                // The session expired while we were away: its leases are gone. Carry on with
                // a new session, so that waiting and future acquires still work.
                let session = self.session.load(Ordering::Relaxed);
                tracing::warn!(
                    session = format_args!("{session:016x}"),
                    "session expired while disconnected"
                );
                self.lose_all(LostReason::Expired);
                self.abandoned.clear();
                self.reconnect(Some(random_id()));
                return;
            }
            Err(Error::Rejected { code, message }) => {
                // The handshake itself was refused: no retry can fix that. Fail what waits,
                // and every later call, with the coordinator's reason.
                tracing::warn!(?code, "the coordinator refused the handshake: {message}");
                self.refused = Some((code, message));
                for (_, p) in std::mem::take(&mut self.pending) {
                    self.uncount(&p);
                    if let Some(reply) = p.reply {
                        let _ = reply.send(Err(self.refusal()));
                    }
                }
                return;
            }
            Ok(Err(e)) | Err(e) => {
                tracing::debug!(error = ?e, "reconnect failed");
                None
            }
        };
        let Some((link, wr, ttl)) = opened else {
            // Back off with jitter, so that many clients do not reconnect in lockstep.
            let jitter =
                Duration::from_millis(random_id() % (self.backoff.as_millis() as u64 / 2 + 1));
            self.next_attempt = Instant::now() + self.backoff + jitter;
            let max = (self.ttl / BACKOFF_TTL_DIVISOR).clamp(MIN_BACKOFF, MAX_BACKOFF);
            self.backoff = (self.backoff * 2).min(max);
            return;
        };
        tracing::debug!(addr = %self.addr, "reconnected to the coordinator");
        if self.notice.take().is_some_and(|n| n.shown) {
            tracing::info!("the coordinator at {} answers again", self.addr);
        }
        self.ttl = ttl;
        self.shared.set_link(link);
        self.linked = true;
        let now = Instant::now();
        self.health.ttl_ms.store(
            u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.heard();
        self.health.connected.store(true, Ordering::Relaxed);
        self.health.away_since.store(NEVER, Ordering::Relaxed);
        self.contact(attempt_started);
        self.last_keepalive = now;
        // The write buffer is empty between turns, so the re-sent requests go first.
        self.take_written();
        for id in resend_order(
            self.pending.keys().copied().collect(),
            self.shared.next_id(),
        ) {
            if let Some(p) = self.pending.get_mut(&id) {
                p.resent = true;
                p.sent_at = now;
                encode(id, &p.req, &mut self.out);
            }
        }
        for lease in std::mem::take(&mut self.abandoned) {
            self.submit(Req::Release { lease }, None, None, false);
        }
        // Always, not only with leases held: the answer also shows a release the coordinator
        // answered but lost in a crash (see `reconcile`).
        self.submit(Req::Leases, None, None, false);
        {
            // Callers may write from here on, behind the re-sent requests.
            let mut w = self.shared.lock();
            w.out.clear();
            std::mem::swap(&mut w.out, &mut self.out);
            w.wr = Some(wr);
        }
        self.flush_shared = true;
        // Events the handshake carried (see `open_link`).
        self.on_frames();
    }

    /// Handles every whole frame the link's buffer holds.
    fn on_frames(&mut self) {
        let failed = self.handle_frames();
        if let Some(why) = failed {
            self.disconnected(&why);
        }
    }

    /// [`Driver::on_frames`] under the inbox lock, which a disconnection must not hold: why
    /// the link is to be dropped, if it is.
    fn handle_frames(&mut self) -> Option<String> {
        let shared = Arc::clone(&self.shared);
        let mut inbox = shared.inbox();
        // The records of requests callers wrote come first: an answer in the buffer now is
        // to a request whose record was made with its write (see `writer`). Taken under the
        // inbox lock, so that no caller puts an answer in the buffer between the two.
        self.take_written();
        let link = inbox.link.as_mut()?;
        self.answered = 0;
        // Taken out so that the replies can be handled while it is read; the frames handled
        // are dropped from its front once, at the end, not one by one.
        let mut buf = std::mem::take(&mut link.buf);
        let mut pos = 0;
        loop {
            let (id, reply) = match split_frame(&buf[pos..], MAX_REPLY_FRAME) {
                Ok(Some((payload, used))) => {
                    let decoded = decode_reply(payload).map(|(id, r)| (id, owned(r)));
                    pos += used;
                    match decoded {
                        Ok(x) => x,
                        Err(e) => return Some(format!("bad frame from server: {e}")),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if let proto::DecodeError::TooLarge { .. } = e {
                        // The reply cannot be taken, and asking again would bring the same:
                        // fail its request (named in the frame's header) rather than re-send
                        // it after the reconnect.
                        let id = buf
                            .get(pos + 5..pos + 9)
                            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                        if let Some(p) = id.and_then(|id| self.pending.remove(&id)) {
                            self.uncount(&p);
                            if let Some(reply) = p.reply {
                                let _ = reply.send(Err(Error::Rejected {
                                    code: ErrorCode::TooLarge,
                                    message: format!("the coordinator's reply is too large: {e}"),
                                }));
                            }
                        }
                    }
                    return Some(format!("bad frame from server: {e}"));
                }
            };
            self.on_reply(id, reply);
        }
        // Several callers woken at once will send again at once: they leave their requests
        // to us, to share one write (see `Shared::crowd`).
        self.shared
            .crowd
            .store(self.answered > 1, Ordering::Relaxed);
        if let Some(link) = inbox.link.as_mut() {
            buf.drain(..pos);
            link.buf = buf;
        }
        None
    }

    fn on_reply(&mut self, id: u32, reply: OwnedReply) {
        if id == 0
            || matches!(
                reply,
                OwnedReply::LeaseLost(..) | OwnedReply::SessionLost(_)
            )
        {
            return self.on_event(reply);
        }
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        self.uncount(&p);
        self.answered += usize::from(p.counted);
        let result = match reply {
            OwnedReply::SessionOpened(ttl) => {
                self.ttl = ttl;
                Ok(Answer::Done)
            }
            OwnedReply::Leases(held) => {
                self.reconcile(&held);
                Ok(Answer::Done)
            }
            other => match result_of(other) {
                Some(result) => result,
                None => return, // the events, handled above
            },
        };
        let session_alive =
            !matches!(&result, Err(e) if e.code() == Some(ErrorCode::SessionNotFound));
        if session_alive && p.req.refreshes_session() && p.sent_at > self.last_contact {
            self.contact(p.sent_at);
        }
        if !session_alive {
            self.session_gone(LostReason::Expired);
        }
        let result = match (&p.req, result) {
            // A re-sent release whose first copy got through finds nothing to release.
            (Req::Release { .. }, Err(e))
                if p.resent && e.code() == Some(ErrorCode::UnknownLease) =>
            {
                Ok(Answer::Done)
            }
            (_, r) => r,
        };
        if let (
            Req::Acquire { lease, .. } | Req::BeginJob { lease, .. },
            Ok(Answer::Granted { .. }),
        ) = (&p.req, &result)
        {
            let caller_waits = p.reply.as_ref().is_some_and(|r| !r.is_closed());
            match p.lost {
                Some(lost) if caller_waits => {
                    self.leases.insert(*lease, lost);
                }
                _ => {
                    // Nobody wants this grant any more (the acquire was dropped): give it back.
                    let lease = *lease;
                    return self.submit(Req::Release { lease }, None, None, false);
                }
            }
        }
        if let Some(reply) = p.reply {
            let _ = reply.send(result);
        }
    }

    fn on_event(&mut self, event: OwnedReply) {
        match event {
            OwnedReply::LeaseLost(lease, reason) => {
                if let Some(tx) = self.leases.remove(&lease) {
                    tx.send(reason);
                }
            }
            OwnedReply::SessionLost(reason) => self.session_gone(reason),
            OwnedReply::Error(code, message) => {
                // Unsolicited errors: the server is shutting down, or we broke the protocol.
                tracing::warn!(?code, message, "the coordinator reports an error");
            }
            _ => {}
        }
    }

    /// The session ended on the coordinator: every lease is lost; open a new session so the
    /// client stays usable.
    fn session_gone(&mut self, reason: LostReason) {
        self.lose_all(reason);
        self.abandoned.clear();
        let fresh = random_id();
        self.session.store(fresh, Ordering::Relaxed);
        self.borrowed = false;
        let ttl_ms = self.ttl_ms;
        self.submit(
            Req::OpenSession {
                session: fresh,
                ttl_ms,
            },
            None,
            None,
            false,
        );
    }

    /// The answer to the `Leases` sent after a resume: every lease we count as held that the
    /// coordinator does not list is lost. A restarted coordinator may have lost the record of
    /// a grant (a damaged end of its log), and a lease may have ended while we were away
    /// without its event reaching us; either way the holder must stop, never silently keep
    /// it. The answer cannot miss a lease we heard granted: the coordinator sends it ahead of
    /// the reply of any grant decided after it, and a lease granted before it is listed.
    ///
    /// The other way round, a lease the coordinator lists that this client handed out but
    /// neither holds nor is acquiring was released: the coordinator answers a release before
    /// its record is durable (ARCHITECTURE invariant 12), so a crash can lose one it answered.
    /// It is released again, or the session would keep a slot nobody uses for as long as it
    /// lives. Leases of other clients of a shared session are theirs to settle.
    fn reconcile(&mut self, held: &[u64]) {
        let acquiring: std::collections::HashSet<u64> = self
            .pending
            .values()
            .filter_map(|p| match p.req {
                Req::Acquire { lease, .. } | Req::BeginJob { lease, .. } => Some(lease),
                _ => None,
            })
            .collect();
        for &lease in held {
            if self.shared.is_own_lease(lease)
                && !self.leases.contains_key(&lease)
                && !acquiring.contains(&lease)
            {
                tracing::info!(
                    lease = %lease,
                    "releasing again a lease the coordinator lost the release of"
                );
                self.submit(Req::Release { lease }, None, None, false);
            }
        }
        let held: std::collections::HashSet<u64> = held.iter().copied().collect();
        self.leases.retain(|lease, lost| {
            let keep = held.contains(lease);
            // A closed channel is a permit already released or dropped: nothing to tell.
            if !keep && !lost.is_closed() {
                tracing::warn!(
                    lease = %lease,
                    "the coordinator no longer has this lease (found on resuming the session)"
                );
                lost.send(LostReason::Forgotten);
            }
            keep
        });
    }

    fn lose_all(&mut self, reason: LostReason) {
        for (_, tx) in self.leases.drain() {
            tx.send(reason);
        }
    }

    async fn close_session(&mut self) {
        // Nobody is connected to tell: the TTL ends the session on the coordinator.
        self.connecting = None;
        if !self.linked {
            return;
        }
        self.now = Instant::now();
        if self.borrowed {
            // Our own leases, held or still queued for; the session stays.
            let mut mine: Vec<u64> = self.leases.keys().copied().collect();
            mine.extend(self.pending.values().filter_map(|p| match p.req {
                Req::Acquire { lease, .. } | Req::BeginJob { lease, .. } => Some(lease),
                _ => None,
            }));
            self.leases.clear();
            for lease in mine {
                self.submit(Req::Release { lease }, None, None, false);
            }
        } else {
            self.submit(Req::CloseSession, None, None, false);
        }
        self.flush().await;
        // Wait briefly for the answers, so that the leases are free when we return.
        let wait = async {
            while self
                .pending
                .values()
                .any(|p| matches!(p.req, Req::CloseSession | Req::Release { .. }))
            {
                let shared = Arc::clone(&self.shared);
                match std::future::poll_fn(|cx| shared.poll_driver_read(cx, false)).await {
                    Ok(()) => {
                        self.now = Instant::now();
                        self.on_frames();
                        self.flush().await;
                    }
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, wait).await;
    }
}

impl Drop for Driver {
    /// However the driver ends (its task dropped with the runtime, too), callers must not
    /// write on, or wait for answers from, a link nobody reads.
    fn drop(&mut self) {
        self.close_writer();
    }
}
