//! The CPU priority of GStreamer's streaming threads, below the HTTP server's.
//!
//! A streaming thread (a source, a queue, an encoder; and the threads an encoder library starts from it, which
//! inherit its priority) works in bursts of a frame, with a part's worth of buffering behind it; a viewer's
//! request waits on the server thread at once. On a core they share, the scheduler let each woken encoder thread
//! preempt the server mid-burst: in the origin bench's throughput rounds (`perf sched`, one core, a 160×90
//! stream beside ~85,000 requests/s) the server was preempted 57 times a second for 0.48 ms on average, and
//! kilnd's plain-mix p99 stood 1.4–3.5 ms above nginx's (seven runs). With the streaming threads at nice 10 the
//! server's average wait fell to 0.18 ms and the gap to 0.77–0.89 ms (three runs; benches/README.md).
//!
//! It changes who goes first, not who gets the CPU: a nice-10 thread still has a tenth of the weight of a server
//! thread, and admission books every encoder's CPU (and reserves the serving load it measures), so an encoder
//! only waits when the server is busy at that instant. What it costs:
//! - A node whose serving outgrows its reservation starves its encoders sooner than at nice 0; they report
//!   `behind_real_time`, and the scheduler moves their streams (`--relieve-behind`).
//! - Every streaming thread is lowered, not only encoders: ingest sources' threads and the muxers' that hand
//!   parts to the origin wait for the server's slice too (milliseconds, against an SRT latency buffer of 120 ms
//!   and parts of hundreds), and all of them yield to any other nice-0 process on the host.
//! - GStreamer's pool threads keep the lower priority when they go back to the pool (an unprivileged process
//!   cannot raise it again); they only run GStreamer's work.
//! - Threads a library starts outside a streaming thread (during a state change, on a tokio thread) keep the
//!   process's priority.
//!
//! `kilnd --media-nice 0` turns it off.
//!
//! How: GStreamer posts `stream-status` (`Enter`) from each streaming thread as it starts; every pipeline's bus
//! sync handler runs in the posting thread and passes the message here ([`on_message`]), which sets that
//! thread's nice value (a per-thread attribute on Linux; elsewhere it would be the whole process's, so this does
//! nothing there). The GStreamer manual's "Configuring priorities" does the same.

use std::sync::atomic::{AtomicI32, Ordering};

/// The nice value streaming threads take (absolute); 0 (or the process's own) leaves them as they are.
static STREAMING_NICE: AtomicI32 = AtomicI32::new(i32::MIN);

/// Makes streaming threads started from now on run `offset` nice levels below the calling thread (kilnd's main
/// thread; its nice is the process's), at most 19. `0` leaves them at the process's priority.
pub fn set_streaming_nice(offset: u8) {
    let base = rustix::process::getpriority_process(None).unwrap_or(0);
    let target = (base + i32::from(offset)).min(19);
    STREAMING_NICE.store(
        if offset == 0 { i32::MIN } else { target },
        Ordering::Relaxed,
    );
}

/// Called by a bus sync handler, in the thread that posted `msg`: a streaming thread entering its loop gets the
/// streaming threads' nice value.
pub(crate) fn on_message(msg: &gst::Message) {
    if !cfg!(target_os = "linux") {
        return;
    }
    if let gst::MessageView::StreamStatus(s) = msg.view() {
        let nice = STREAMING_NICE.load(Ordering::Relaxed);
        if nice != i32::MIN && s.get().0 == gst::StreamStatusType::Enter {
            if let Err(e) = rustix::process::setpriority_process(None, nice) {
                tracing::debug!(error = %e, nice, "could not lower a streaming thread's priority");
            }
        }
    }
}
