//! Playlist requests parked on a socket lent to the rendition ([`kiln_http::lend`]): the publish that answers
//! them writes their answers itself.
//!
//! A blocking playlist reload on kiln's own HTTP/1.1 lends its socket while it waits, and is registered with its
//! rendition ([`Waiters`]) instead of subscribing to the rendition's publishes. After each publish the stream
//! calls [`serve`]: it evaluates every registered request against the new state (requests with the same
//! query, token and encoding share one evaluation; past [`FORMS`] distinct ones a request evaluates itself), writes the prepared answer of each it satisfies on its socket,
//! observes the fan-out (publish → written) there, and only then wakes their connections, which go on to their
//! next request. The writes are split over the runtime's workers, one chunk each. A request the state refuses
//! (not a prepared answer) is woken to answer by itself; one still waiting stays registered. Its deadline stays
//! its own (a timer in its future), so a stalled stream times it out as before.
//!
//! Why: with a task woken per parked request, kilnd's fan-out on two cores stood 5–30 ms above a bare tokio
//! program's, and only a loop that writes the answers itself ever came under 50 ms (benches/README.md, "Fan-out
//! with a light client"). HTTP/2, TLS, hyper's connections and requests the compression layer negotiates keep
//! the subscribed path ([`super::playlist`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kiln_http::lend::{After, Lent, Loan, Woken, Wrote};
use kiln_llhls::packager::PartPos;
use parking_lot::Mutex;

use super::park::Park;
use super::{parked_too_long, playlist_step, PlaylistQuery, Reply, Timing};
use crate::published::Published;
use crate::store::{clock_ns, Rendition};

/// Requests per worker below which the publishing thread writes them alone: another worker's wake-up is not
/// worth it.
const MIN_CHUNK: usize = 256;

/// Distinct forms one worker's share of a [`serve`] evaluates. A request of a further form is woken to look at the
/// state itself, on its own worker: the publishing thread never does per-request work (signing a playlist for
/// one viewer's token, gzipping it) for more than a few forms, however many viewers hold distinct tokens.
pub(super) const FORMS: usize = 16;

/// The smallest length at which a registration sweeps out requests that ended without a publish.
const PRUNE_FROM: usize = 64;

/// What a lent request asked for: its answer is a function of this and the published state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Form {
    pub q: PlaylistQuery,
    pub token: Option<String>,
    pub gzip: bool,
}

/// A request parked on a lent socket.
#[derive(Debug)]
pub(crate) struct Waiter {
    loan: Loan,
    form: Form,
}

/// A rendition's requests parked on lent sockets.
#[derive(Debug)]
pub(crate) struct Waiters {
    list: Vec<Waiter>,
    /// The length at which the next registration sweeps out ended requests (a stream that stalls publishes
    /// nothing that would).
    prune_at: usize,
    /// The origin's fan-out histogram (the registry is the rendition's, the histogram the origin's).
    fanout: Option<prometheus::Histogram>,
}

impl Default for Waiters {
    fn default() -> Self {
        Waiters {
            list: Vec::new(),
            prune_at: PRUNE_FROM,
            fanout: None,
        }
    }
}

/// Registers a request that found `seen` not enough, unless `r` has published since (`Err`: look again). Under
/// the registry's lock, so a publish either finds it there or came before and is seen.
fn register(
    r: &Rendition,
    w: Waiter,
    seen: &Arc<Published>,
    fanout: &prometheus::Histogram,
) -> Result<(), Waiter> {
    let mut l = r.lent.lock();
    if !r.is_current(seen) {
        return Err(w);
    }
    if l.fanout.is_none() {
        l.fanout = Some(fanout.clone());
    }
    if l.list.len() >= l.prune_at {
        l.list.retain(|w| w.loan.is_open());
        l.prune_at = (2 * l.list.len()).max(PRUNE_FROM);
    }
    l.list.push(w);
    Ok(())
}

/// Parks a playlist request on its lent socket, its state `seen` not answering it; `Err` gives the pieces back
/// when the rendition published meanwhile (the caller parks it the subscribed way, which then looks at once).
pub(super) fn park(
    r: Arc<Rendition>,
    (lent, loan): (Lent, Loan),
    form: Form,
    seen: &Arc<Published>,
    fanout: &prometheus::Histogram,
) -> Result<LentWait, Form> {
    let w = Waiter {
        loan,
        form: form.clone(),
    };
    match register(&r, w, seen, fanout) {
        Ok(()) => Ok(LentWait {
            r,
            lent,
            form,
            fanout: fanout.clone(),
        }),
        Err(w) => Err(w.form), // `lent` is dropped: the socket is taken back
    }
}

/// A registered request's side of the wait.
pub(super) struct LentWait {
    r: Arc<Rendition>,
    lent: Lent,
    form: Form,
    fanout: prometheus::Histogram,
}

impl LentWait {
    /// Waits for the publish that writes the answer, or answers by itself (a refusal, or the deadline).
    pub(super) async fn answer(
        mut self,
        mut park: Park<Arc<Published>>,
        timing: impl Fn() -> Timing,
    ) -> Reply {
        loop {
            match tokio::time::timeout_at(park.deadline(), self.lent.woken()).await {
                Ok(Woken::Written(w)) => return Reply::Written(w),
                Ok(Woken::LookAgain) => {}
                Err(_) => {
                    return match self.lent.withdraw() {
                        Some(w) => Reply::Written(w),
                        None => parked_too_long().into(),
                    }
                }
            }
            loop {
                let snap = park.current();
                let f = &self.form;
                // an answer the publish did not write (not a prepared one: a TARGETDURATION over 10 s, whose
                // lifetime line is not prepared): its fan-out ends when its connection has written it, as for a
                // subscribed request
                let (r, fanout) = (&self.r, &self.fanout);
                let ready = std::cell::Cell::new(false);
                let stamp = |body| {
                    ready.set(true);
                    match f.q.block.msn.zip(f.q.block.part) {
                        Some((m, p)) => r.stamped(body, PartPos::new(m, p), fanout),
                        None => body,
                    }
                };
                if let Some(reply) = playlist_step(timing(), (f.q, &f.token, f.gzip), &snap, stamp)
                {
                    return match self.lent.withdraw() {
                        Some(w) => Reply::Written(w), // (the publish that wrote it noted it)
                        None => {
                            if ready.get() {
                                r.note_served(&snap);
                            }
                            reply
                        }
                    };
                }
                let w = Waiter {
                    loan: self.lent.loan(),
                    form: self.form.clone(),
                };
                if register(&self.r, w, &snap, &self.fanout).is_ok() {
                    break;
                }
            }
        }
    }
}

/// Answers the requests parked on `r`'s lent sockets that its current state satisfies (see the module's doc).
/// Called after each publish of `r`, on the publishing thread, which takes part: inside a runtime with several
/// workers (and [`MIN_CHUNK`] requests for each), tasks that the other workers take join it, each taking the next
/// [`BATCH`] requests until none are left (so all end together, however late one starts or often it is
/// preempted).
pub(crate) fn serve(timing: Timing, r: &Arc<Rendition>) {
    let (waiters, fanout) = {
        let mut l = r.lent.lock();
        if l.list.is_empty() {
            return;
        }
        let Some(fanout) = l.fanout.clone() else {
            return;
        };
        (std::mem::take(&mut l.list), fanout)
    };
    // the other workers that join in
    let helpers = tokio::runtime::Handle::try_current()
        .ok()
        .filter(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        .map_or(0, |h| h.metrics().num_workers().saturating_sub(1))
        .min(waiters.len() / MIN_CHUNK);
    let run = Arc::new(Run {
        timing,
        r: r.clone(),
        snap: r.snapshot(),
        fanout,
        waiters: waiters.into_iter().map(|w| Mutex::new(Some(w))).collect(),
        next: AtomicUsize::new(0),
    });
    // a task per other worker, and one more: the task spawned last waits in this worker's LIFO slot, where no
    // other worker takes it (it finds nothing left when it runs); the others go to this worker's queue, where
    // idle workers steal them
    let tasks = if helpers > 0 { helpers + 1 } else { 0 };
    for _ in 0..tasks {
        let run = run.clone();
        tokio::spawn(async move { run.work() });
    }
    run.work();
}

/// What a worker of a [`Run`] holds that a panic in it (a bug) would otherwise leave waiting for its deadline: on
/// unwinding, the requests it kept and every request of the run no worker has taken look at the state themselves.
/// (The one being answered when it panicked is lost with it: it waits for its deadline.)
struct Unwound<'a> {
    run: &'a Run,
    keep: Vec<Waiter>,
}

impl Drop for Unwound<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut after = After::default();
        for w in self.keep.drain(..) {
            w.loan.look_again(&mut after);
        }
        for slot in &self.run.waiters {
            let untaken = slot.lock().take();
            if let Some(w) = untaken {
                w.loan.look_again(&mut after);
            }
        }
        after.finish();
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: a run on this thread panics at the request after this many.
    pub(crate) static PANIC_AT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Requests taken by one worker of a [`serve`] at a time.
const BATCH: usize = 32;

/// One [`serve`]: the registered requests, and the next one no worker has taken.
struct Run {
    timing: Timing,
    r: Arc<Rendition>,
    snap: Arc<Published>,
    fanout: prometheus::Histogram,
    /// Each taken once (the lock is never contended: the cursor hands each index to one worker).
    waiters: Vec<Mutex<Option<Waiter>>>,
    next: AtomicUsize,
}

impl Run {
    /// Answers batches of requests until none are left.
    fn work(&self) {
        if self.next.load(Ordering::Relaxed) >= self.waiters.len() {
            return;
        }
        let start = std::time::Instant::now();
        let (r, snap) = (&self.r, &self.snap);
        // the requests the publish does not satisfy (they register again), in a guard that lets them, and the
        // run's untaken ones, look again should anything below panic
        let mut left = Unwound {
            run: self,
            keep: Vec::new(),
        };
        let mut after = After::default();
        let local = self.fanout.local();
        // the answers to the forms evaluated (the one used last first), and when the last part asked for was
        // published
        let mut forms: Vec<(Form, Option<Reply>)> = Vec::new();
        let mut last = 0;
        let mut published: Option<(PartPos, Option<u64>)> = None;
        // answers written from `snap` (what `Rendition::served_from` counts)
        let mut served = 0;
        loop {
            let from = self.next.fetch_add(BATCH, Ordering::Relaxed);
            if from >= self.waiters.len() {
                break;
            }
            let to = (from + BATCH).min(self.waiters.len());
            for w in &self.waiters[from..to] {
                let Some(w) = w.lock().take() else {
                    continue;
                };
                if !w.loan.is_open() {
                    continue; // its request ended by itself (its deadline, or its client left)
                }
                #[cfg(test)]
                PANIC_AT.with(|p| match p.get() {
                    Some(0) => {
                        p.set(None);
                        panic!("a panic injected into a run");
                    }
                    n => p.set(n.map(|n| n - 1)),
                });
                let found = if forms.get(last).is_some_and(|(f, _)| *f == w.form) {
                    Some(last)
                } else {
                    forms.iter().position(|(f, _)| *f == w.form)
                };
                last = match found {
                    Some(i) => i,
                    None if forms.len() < FORMS => {
                        let f = &w.form;
                        let reply =
                            playlist_step(self.timing, (f.q, &f.token, f.gzip), snap, |b| b);
                        forms.push((w.form.clone(), reply));
                        forms.len() - 1
                    }
                    None => {
                        w.loan.look_again(&mut after);
                        continue;
                    }
                };
                let p = match forms[last].1.as_ref() {
                    None => {
                        left.keep.push(w);
                        continue;
                    }
                    Some(Reply::Prepared(p)) => p,
                    Some(_) => {
                        w.loan.look_again(&mut after);
                        continue;
                    }
                };
                // a blocking reload answered by the publish of the part it asked for: the fan-out, observed once
                // the whole answer is written (here, or by its connection)
                let at = w
                    .form
                    .q
                    .block
                    .msn
                    .zip(w.form.q.block.part)
                    .and_then(|(m, p)| {
                        let pos = PartPos::new(m, p);
                        match published {
                            Some((p, at)) if p == pos => at,
                            _ => {
                                let at = r.part_published_ns(pos);
                                published = Some((pos, at));
                                at
                            }
                        }
                    });
                let finish = || -> Box<dyn FnOnce() + Send> {
                    let fanout = self.fanout.clone();
                    Box::new(move || {
                        if let Some(at) = at {
                            fanout.observe(clock_ns().saturating_sub(at) as f64 / 1e9);
                        }
                    })
                };
                match w.loan.write(p, &mut after, finish) {
                    // not an answer served (its connection closes)
                    Wrote::Not | Wrote::Failed => continue,
                    Wrote::Whole => {
                        if let Some(at) = at {
                            local.observe(clock_ns().saturating_sub(at) as f64 / 1e9);
                        }
                    }
                    Wrote::Part => {}
                }
                served += 1;
            }
        }
        local.flush();
        if served > 0 {
            r.note_served_n(snap, served);
        }
        after.finish();
        let keep = std::mem::take(&mut left.keep);
        drop(left);
        if !keep.is_empty() {
            let mut l = r.lent.lock();
            if r.is_current(snap) {
                l.list.extend(keep); // a later publish finds them (it publishes before it takes the registry)
            } else {
                // a publish while this ran took the registry without these: they look at its state themselves
                // (and the stream's timing then, which may have changed with it), and register again to wait
                drop(l);
                let mut after = After::default();
                for w in keep {
                    w.loan.look_again(&mut after);
                }
                after.finish();
            }
        }
        kiln_http::server::add_serving(start.elapsed());
    }
}
