//! Load measured while a node runs, as opposed to what admission books: what serving viewers costs the daemon
//! (its HTTP server's time, requests and bytes answered) and whether a stream keeps up with real time over the
//! last seconds. Pure: the daemon samples its counters on a clock and feeds them here.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// A rate from cumulative samples over a sliding window of `span_s` seconds (the caller's clock, in seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct RateWindow {
    span_s: f64,
    samples: VecDeque<(f64, f64)>,
}

impl RateWindow {
    pub fn new(span_s: f64) -> Self {
        RateWindow {
            span_s,
            samples: VecDeque::new(),
        }
    }

    /// Adds the running total `total` at `at_s`. A sample that goes back in time resets the window (a counter
    /// that was recreated); samples older than the span go, except the newest of them, which anchors the window.
    pub fn push(&mut self, at_s: f64, total: f64) {
        if self
            .samples
            .back()
            .is_some_and(|&(t, v)| at_s <= t || total < v)
        {
            self.samples.clear();
        }
        self.samples.push_back((at_s, total));
        while self.samples.len() > 2 && self.samples[1].0 <= at_s - self.span_s {
            self.samples.pop_front();
        }
    }

    /// Seconds the samples cover.
    pub fn covered_s(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(a), Some(b)) => b.0 - a.0,
            _ => 0.0,
        }
    }

    /// Units per second over the window; `None` before two samples.
    pub fn rate(&self) -> Option<f64> {
        let (a, b) = (self.samples.front()?, self.samples.back()?);
        (b.0 > a.0).then(|| (b.1 - a.1) / (b.0 - a.0))
    }
}

/// What answering HTTP requests (viewers, and the control API) costs a node now: the time its HTTP server spends
/// inside polls of connections and requests, per second. Wall time inside a poll: on a saturated host a poll
/// preempted by other threads counts their time too, so this is an upper bound then, and it cannot exceed the
/// server's worker threads × 1,000. Reported in `GET /v1/capacity` (`host.serving`); admission keeps
/// `reserved_millicores` free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServingLoad {
    /// Time inside the HTTP server's polls per second over the last window (millicores).
    pub millicores: u64,
    /// The most `millicores` reached over the hold period.
    pub peak_millicores: u64,
    /// What admission keeps free (and the scheduler counts as used): the peak above the floor, the runtime's own
    /// background work, which the streams' calibrated prices already include.
    pub reserved_millicores: u64,
    pub requests_per_s: u64,
    /// Response body bytes per second (complete bodies; a segment streamed part by part is not counted).
    pub bytes_per_s: u64,
    /// What 1,000 requests/s cost here (millicores), measured over the window; absent below 100 requests/s,
    /// where a reading is mostly noise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millicores_per_1k_rps: Option<u64>,
    /// What the host's calibrated serving costs (`kilnd calibrate`, [`ServingCost`]) make of the current rates,
    /// beside `millicores` as measured; absent without a calibrated profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrated_millicores: Option<u64>,
    /// How many more requests/s the CPU admission has left could answer at the calibrated costs, for answers of
    /// the mean size served now (of the calibrated small answers below 100 requests/s); absent without a
    /// calibrated profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom_rps: Option<u64>,
}

/// What serving costs on a host, as `kilnd calibrate` measured it (the CPU profile's `[serving]` table): CPU
/// per 1,000 requests/s, and per MB/s of response bodies on top of that. Measured from two mixes of the origin's
/// own answers on the host's real HTTP stack: small answers (playlists and parts) and whole segments.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServingCost {
    /// Millicores that 1,000 requests/s cost, apart from their bytes.
    pub millicores_per_1k_rps: f64,
    /// Millicores that 1 MB/s (10^6 bytes) of response bodies cost.
    pub millicores_per_mbps: f64,
    /// The mean body of the small-answer mix (bytes): the size [`ServingCost::headroom_rps`] assumes on an idle
    /// node.
    pub small_answer_bytes: u64,
}

/// One measured mix: the server's busy millicores while answering `rps` requests/s moving `bytes_per_s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixReading {
    pub millicores: f64,
    pub rps: f64,
    pub bytes_per_s: f64,
}

impl ServingLoad {
    /// Fills [`Self::calibrated_millicores`] and [`Self::headroom_rps`] from the host's calibrated `cost`, with
    /// `free_millicores` left to admission.
    pub fn with_cost(mut self, cost: &ServingCost, free_millicores: u64) -> Self {
        let (rps, bytes) = (self.requests_per_s as f64, self.bytes_per_s as f64);
        let bytes_each = if rps >= MIN_RPS_FOR_COST {
            bytes / rps
        } else {
            cost.small_answer_bytes as f64
        };
        self.calibrated_millicores = Some(cost.millicores(rps, bytes).round() as u64);
        self.headroom_rps = Some(cost.headroom_rps(free_millicores, bytes_each));
        self
    }
}

impl ServingCost {
    /// The costs that explain both readings: `small` (many requests, few bytes each) and `large` (fewer requests,
    /// many bytes each). A cost the readings make negative (noise: bytes nearly free) is 0 and the other explains
    /// the small mix alone. `None` when the mixes cannot be told apart (their bytes per request within 2×) or a
    /// reading has no requests.
    pub fn fit(small: MixReading, large: MixReading) -> Option<ServingCost> {
        if small.rps <= 0.0 || large.rps <= 0.0 {
            return None;
        }
        let (bs, bl) = (small.bytes_per_s / small.rps, large.bytes_per_s / large.rps);
        if bl < 2.0 * bs {
            return None;
        }
        // m = a·(rps/1000) + b·(bytes/s / 10^6)
        let (r1, b1, m1) = (small.rps / 1e3, small.bytes_per_s / 1e6, small.millicores);
        let (r2, b2, m2) = (large.rps / 1e3, large.bytes_per_s / 1e6, large.millicores);
        let det = r1 * b2 - r2 * b1;
        let (mut a, mut b) = ((m1 * b2 - m2 * b1) / det, (r1 * m2 - r2 * m1) / det);
        if b < 0.0 {
            (a, b) = (m1 / r1, 0.0);
        } else if a < 0.0 {
            (a, b) = (0.0, m2 / b2);
        }
        (a.is_finite() && b.is_finite()).then_some(ServingCost {
            millicores_per_1k_rps: a,
            millicores_per_mbps: b,
            small_answer_bytes: bs.round() as u64,
        })
    }

    /// Millicores for `rps` requests/s moving `bytes_per_s`.
    pub fn millicores(&self, rps: f64, bytes_per_s: f64) -> f64 {
        self.millicores_per_1k_rps * rps / 1e3 + self.millicores_per_mbps * bytes_per_s / 1e6
    }

    /// How many more requests/s of `bytes_each` bytes `free_millicores` can answer.
    pub fn headroom_rps(&self, free_millicores: u64, bytes_each: f64) -> u64 {
        let per_request = self.millicores(1.0, bytes_each.max(0.0));
        if per_request <= 0.0 {
            return 0;
        }
        (free_millicores as f64 / per_request).floor() as u64
    }
}

/// Below this many requests/s, the cost per request is not reported: too few to tell from noise.
const MIN_RPS_FOR_COST: f64 = 100.0;

/// Samples of the serving counters, turned into a [`ServingLoad`].
#[derive(Debug, Clone)]
pub struct ServingMeter {
    busy: RateWindow,
    requests: RateWindow,
    bytes: RateWindow,
    /// Recent `(at_s, millicores)` readings, for the reservation's peak.
    recent: VecDeque<(f64, u64)>,
    hold_s: f64,
    floor_millicores: u64,
}

impl ServingMeter {
    /// `window_s`: the span rates are measured over; `hold_s`: how long a peak stays reserved; `floor_millicores`:
    /// what is never reserved.
    pub fn new(window_s: f64, hold_s: f64, floor_millicores: u64) -> Self {
        ServingMeter {
            busy: RateWindow::new(window_s),
            requests: RateWindow::new(window_s),
            bytes: RateWindow::new(window_s),
            recent: VecDeque::new(),
            hold_s,
            floor_millicores,
        }
    }

    /// One reading of the cumulative counters at `at_s`: seconds spent serving, requests answered, body bytes
    /// sent.
    pub fn sample(&mut self, at_s: f64, busy_s: f64, requests: u64, bytes: u64) {
        self.busy.push(at_s, busy_s);
        self.requests.push(at_s, requests as f64);
        self.bytes.push(at_s, bytes as f64);
        let mc = self.millicores();
        self.recent.push_back((at_s, mc));
        while self
            .recent
            .front()
            .is_some_and(|&(t, _)| t < at_s - self.hold_s)
        {
            self.recent.pop_front();
        }
    }

    fn millicores(&self) -> u64 {
        self.busy
            .rate()
            .map_or(0, |r| (r * 1000.0).max(0.0).round() as u64)
    }

    pub fn load(&self) -> ServingLoad {
        let millicores = self.millicores();
        let rps = self.requests.rate().unwrap_or(0.0).max(0.0);
        let peak = self
            .recent
            .iter()
            .map(|&(_, m)| m)
            .max()
            .unwrap_or(0)
            .max(millicores);
        ServingLoad {
            millicores,
            peak_millicores: peak,
            reserved_millicores: peak.saturating_sub(self.floor_millicores),
            requests_per_s: rps.round() as u64,
            bytes_per_s: self.bytes.rate().unwrap_or(0.0).max(0.0).round() as u64,
            millicores_per_1k_rps: (rps >= MIN_RPS_FOR_COST)
                .then(|| (millicores as f64 * 1000.0 / rps).round() as u64),
            calibrated_millicores: None,
            headroom_rps: None,
        }
    }
}

/// Below this share of real time over the window, a running stream is behind: its parts come slower than
/// their duration, so playlists fall back and players stall.
pub const BEHIND_REAL_TIME_BELOW: f64 = 0.9;

/// How long a window [`RealtimeMeter`] needs before it judges (shorter windows swing with one part).
pub const REALTIME_WINDOW_MIN_S: f64 = 4.0;

/// Media seconds published per wall-clock second over the last seconds (the slowest rendition's).
#[derive(Debug, Clone)]
pub struct RealtimeMeter {
    window: RateWindow,
}

impl RealtimeMeter {
    pub fn new(window_s: f64) -> Self {
        RealtimeMeter {
            window: RateWindow::new(window_s),
        }
    }

    /// The slowest rendition's total media seconds at wall-clock `at_s`.
    pub fn sample(&mut self, at_s: f64, media_s: f64) {
        self.window.push(at_s, media_s);
    }

    /// The ratio over the window, once it covers [`REALTIME_WINDOW_MIN_S`].
    pub fn ratio(&self) -> Option<f64> {
        (self.window.covered_s() >= REALTIME_WINDOW_MIN_S)
            .then(|| self.window.rate())
            .flatten()
    }

    /// Whether the stream falls behind real time (judged only over a full enough window).
    pub fn behind(&self) -> bool {
        self.ratio().is_some_and(|r| r < BEHIND_REAL_TIME_BELOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_spans_the_window_and_resets_when_a_counter_goes_back() {
        let mut w = RateWindow::new(10.0);
        assert_eq!(w.rate(), None);
        w.push(0.0, 0.0);
        assert_eq!(w.rate(), None);
        for t in 1..=30 {
            w.push(f64::from(t), f64::from(t) * 5.0);
        }
        assert_eq!(w.rate(), Some(5.0));
        assert!((10.0..=11.0).contains(&w.covered_s()), "{}", w.covered_s());
        // the rate changes: the window follows within its span
        for t in 31..=45 {
            w.push(f64::from(t), 150.0 + f64::from(t - 30));
        }
        assert_eq!(w.rate(), Some(1.0));
        // a counter recreated (lower total): start again rather than report a negative rate
        w.push(46.0, 3.0);
        assert_eq!(w.rate(), None);
        w.push(47.0, 5.0);
        assert_eq!(w.rate(), Some(2.0));
    }

    #[test]
    fn serving_cost_fits_both_mixes_and_gives_headroom() {
        // truth: 10 mc per 1k rps, 2 mc per MB/s
        let reading = |rps: f64, bytes_each: f64| MixReading {
            millicores: 10.0 * rps / 1e3 + 2.0 * rps * bytes_each / 1e6,
            rps,
            bytes_per_s: rps * bytes_each,
        };
        let c = ServingCost::fit(reading(50_000.0, 4_000.0), reading(2_000.0, 400_000.0)).unwrap();
        assert!((c.millicores_per_1k_rps - 10.0).abs() < 1e-9, "{c:?}");
        assert!((c.millicores_per_mbps - 2.0).abs() < 1e-9, "{c:?}");
        assert_eq!(c.small_answer_bytes, 4_000);
        // 1 core free, 4 KB answers: 1000 / (0.01 + 0.008) requests/s
        assert_eq!(c.headroom_rps(1000, 4_000.0), 55_555);
        assert_eq!(c.headroom_rps(0, 4_000.0), 0);
        // bytes that look free (noise): the request cost explains the small mix alone
        let mut large = reading(2_000.0, 400_000.0);
        large.millicores = 5.0;
        let c = ServingCost::fit(reading(50_000.0, 4_000.0), large).unwrap();
        assert_eq!(c.millicores_per_mbps, 0.0);
        assert!((c.millicores_per_1k_rps - 18.0).abs() < 1e-9, "{c:?}");
        // mixes that cannot be told apart, or no requests
        assert_eq!(
            ServingCost::fit(reading(50_000.0, 4_000.0), reading(40_000.0, 6_000.0)),
            None
        );
        assert_eq!(ServingCost::fit(reading(0.0, 4_000.0), large), None);
        // a node's report: its own answer size while it serves, the calibrated one while idle
        let cost = ServingCost {
            millicores_per_1k_rps: 10.0,
            millicores_per_mbps: 2.0,
            small_answer_bytes: 4_000,
        };
        let busy = ServingLoad {
            requests_per_s: 10_000,
            bytes_per_s: 1_000_000_000,
            ..Default::default()
        }
        .with_cost(&cost, 1000);
        // 100 + 2,000 mc; 100 KB answers: 1000 / (0.01 + 0.2)
        assert_eq!(busy.calibrated_millicores, Some(2100));
        assert_eq!(busy.headroom_rps, Some(4761));
        let idle = ServingLoad::default().with_cost(&cost, 1000);
        assert_eq!(
            (idle.calibrated_millicores, idle.headroom_rps),
            (Some(0), Some(55_555))
        );
    }

    #[test]
    fn serving_load_is_busy_time_per_second_and_its_peak_is_held() {
        let mut m = ServingMeter::new(5.0, 30.0, 100);
        // 0.25 s busy per second, 2,000 requests/s of 4 KB
        for t in 0..=10 {
            let t = f64::from(t);
            m.sample(t, t * 0.25, (t * 2000.0) as u64, (t * 8e6) as u64);
        }
        let l = m.load();
        assert_eq!(l.millicores, 250);
        assert_eq!(l.peak_millicores, 250);
        assert_eq!(l.reserved_millicores, 150, "above the floor");
        assert_eq!(l.requests_per_s, 2000);
        assert_eq!(l.bytes_per_s, 8_000_000);
        assert_eq!(l.millicores_per_1k_rps, Some(125));
        // the load stops: the rate falls to 0 within the window, the reservation holds the peak for 30 s
        for t in 11..=20 {
            m.sample(f64::from(t), 2.5, 20_000, 80_000_000);
        }
        let l = m.load();
        assert_eq!(l.millicores, 0);
        assert_eq!(l.peak_millicores, 250);
        assert_eq!(l.reserved_millicores, 150);
        assert_eq!(
            l.millicores_per_1k_rps, None,
            "no cost below 100 requests/s"
        );
        for t in 21..=45 {
            m.sample(f64::from(t), 2.5, 20_000, 80_000_000);
        }
        assert_eq!(m.load().peak_millicores, 0, "the peak left the hold period");
        assert_eq!(m.load().reserved_millicores, 0);
    }

    #[test]
    fn a_stream_is_behind_only_over_a_full_window_below_nine_tenths() {
        let mut r = RealtimeMeter::new(5.0);
        r.sample(0.0, 0.0);
        r.sample(1.0, 0.5);
        assert!(!r.behind(), "one second is too short to judge");
        assert_eq!(r.ratio(), None);
        for t in 2..=10 {
            r.sample(f64::from(t), f64::from(t));
        }
        assert!(!r.behind());
        assert!((r.ratio().unwrap() - 1.0).abs() < 1e-9);
        // parts slow to 0.8 × real time
        for t in 11..=20 {
            r.sample(f64::from(t), 10.0 + 0.8 * f64::from(t - 10));
        }
        assert!(r.behind());
        // parts stop entirely: still behind (no sample of media progress)
        for t in 21..=30 {
            r.sample(f64::from(t), 18.0);
        }
        assert_eq!(r.ratio(), Some(0.0));
        assert!(r.behind());
    }
}
