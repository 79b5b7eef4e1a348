//! Latency math: HDR histograms in microseconds, the open-loop schedule, the
//! coordinated-omission correction, quantile summaries, and the ratios the report prints.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Largest latency tracked (60 s, in µs); larger values are clamped to it.
pub const MAX_US: u64 = 60_000_000;

/// An empty latency histogram: 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that satisfy hdrhistogram's preconditions.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid static histogram bounds")
}

/// Records `latency`, rounded to whole µs, at least 1, at most [`MAX_US`].
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros()).unwrap_or(MAX_US);
    histogram.saturating_record(us.clamp(1, MAX_US));
}

/// Merges per-connection histograms.
pub fn merge(parts: impl IntoIterator<Item = Histogram<u64>>) -> Histogram<u64> {
    let mut all = histogram();
    for part in parts {
        // Same bounds everywhere, so adding cannot fail; clamp rather than lose a run.
        if all.add(&part).is_err() {
            for v in part.iter_recorded() {
                all.saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }
    all
}

/// The open-loop schedule: `total` requests at `rate` per second spread over `conns`
/// connections. Request `j` (0-based, global) is due `j / rate` seconds after the start
/// and goes on connection `j % conns`, so each connection sends every `conns / rate`
/// seconds and the connections interleave evenly.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Requests per second, all connections together.
    pub rate: f64,
    /// Connections.
    pub conns: u64,
    /// Requests in the whole run.
    pub total: u64,
}

impl Schedule {
    /// When the `k`-th request of connection `conn` is due, from the start.
    pub fn due(&self, conn: u64, k: u64) -> Duration {
        Duration::from_secs_f64((conn + k * self.conns) as f64 / self.rate)
    }

    /// How many requests connection `conn` sends.
    pub fn per_conn(&self, conn: u64) -> u64 {
        if conn >= self.total || self.conns == 0 {
            0
        } else {
            (self.total - conn).div_ceil(self.conns)
        }
    }
}

/// Latency of one open-loop request, corrected for coordinated omission.
///
/// `due` is when the schedule wanted it sent, `free` when its connection finished the
/// previous request, `sent` when it actually went out and `done` when the response
/// ended (all from the run's start). When the connection was still busy at `due`, the
/// server made the request wait, so it is charged from `due` (the whole queueing delay
/// a real client arriving on time would have seen). When the connection was free,
/// any gap between `due` and `sent` is the load generator's own timer lateness (tokio
/// timers tick in milliseconds) and is not charged to the server.
pub fn corrected_latency(
    due: Duration,
    free: Duration,
    sent: Duration,
    done: Duration,
) -> Duration {
    let start = if free > due { due } else { sent.max(due) };
    done.saturating_sub(start)
}

/// The quantiles the report prints, in µs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// Requests measured.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

/// Quantiles of `h`.
pub fn summary(h: &Histogram<u64>) -> Summary {
    if h.is_empty() {
        return Summary::default();
    }
    Summary {
        count: h.len(),
        p50: h.value_at_quantile(0.50),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

/// Latency a proxy adds over the direct path, quantile by quantile (µs; can be
/// negative within noise).
pub fn added(target: &Summary, direct: &Summary) -> [i64; 3] {
    let d = |a: u64, b: u64| a as i64 - b as i64;
    [
        d(target.p50, direct.p50),
        d(target.p99, direct.p99),
        d(target.p999, direct.p999),
    ]
}

/// `a / b`, or `None` when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}

/// Work per core: `count` events that cost `cpu_seconds` of the server's CPU.
pub fn per_core_second(count: u64, cpu_seconds: f64) -> Option<f64> {
    ratio(count as f64, cpu_seconds)
}

/// CPU seconds per 1000 events.
pub fn cpu_per_thousand(cpu_seconds: f64, count: u64) -> Option<f64> {
    (count > 0).then(|| cpu_seconds * 1000.0 / count as f64)
}

/// Simulates one connection of an open-loop run against a server whose service time
/// for request `k` is `service(k)`, with a perfect timer; returns the corrected
/// latencies. The real loop in `load.rs` applies the same rules.
#[cfg(test)]
pub fn simulate_connection(
    schedule: &Schedule,
    conn: u64,
    service: impl Fn(u64) -> Duration,
) -> Histogram<u64> {
    let mut h = histogram();
    let mut free = Duration::ZERO;
    for k in 0..schedule.per_conn(conn) {
        let due = schedule.due(conn, k);
        let sent = due.max(free);
        let done = sent + service(k);
        record(&mut h, corrected_latency(due, free, sent, done));
        free = done;
    }
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us));
        }
        let s = summary(&h);
        assert_eq!(s.count, 1000);
        // 3 significant digits: exact below 2048 µs.
        assert_eq!(s.p50, 500);
        assert_eq!(s.p99, 990);
        assert_eq!(s.p999, 999);
        assert_eq!(s.max, 1000);
        assert_eq!(summary(&histogram()), Summary::default());
    }

    #[test]
    fn record_clamps_and_merge_adds_counts() {
        let mut a = histogram();
        record(&mut a, Duration::ZERO);
        record(&mut a, Duration::from_secs(3600));
        assert_eq!(a.min(), 1);
        assert!(a.max() >= MAX_US && a.max() <= MAX_US + MAX_US / 1000);
        let mut b = histogram();
        record(&mut b, Duration::from_micros(70));
        let all = merge([a, b]);
        assert_eq!(all.len(), 3);
        assert_eq!(summary(&all).p50, 70);
    }

    #[test]
    fn schedule_spreads_requests_over_connections() {
        let s = Schedule {
            rate: 1000.0,
            conns: 4,
            total: 10,
        };
        assert_eq!(
            (0..4).map(|c| s.per_conn(c)).collect::<Vec<_>>(),
            [3, 3, 2, 2]
        );
        assert_eq!((0..4).map(|c| s.per_conn(c)).sum::<u64>(), 10);
        assert_eq!(s.due(0, 0), Duration::ZERO);
        assert_eq!(s.due(1, 0), MS);
        assert_eq!(s.due(0, 1), 4 * MS);
        assert_eq!(s.due(3, 1), 7 * MS);
        let few = Schedule { total: 2, ..s };
        assert_eq!(few.per_conn(3), 0);
    }

    #[test]
    fn correction_charges_server_stalls_but_not_timer_lateness() {
        // Connection free at due, timer woke 0.8 ms late: only the service time counts.
        let l = corrected_latency(10 * MS, 5 * MS, Duration::from_micros(10_800), 11 * MS);
        assert_eq!(l, Duration::from_micros(200));
        // Connection busy until after due: charged from due.
        let l = corrected_latency(10 * MS, 30 * MS, 30 * MS, 31 * MS);
        assert_eq!(l, 21 * MS);
    }

    #[test]
    fn a_stall_is_seen_by_every_request_scheduled_during_it() {
        // One connection, a request every 10 ms for 2 s; request 10 takes 1 s.
        let schedule = Schedule {
            rate: 100.0,
            conns: 1,
            total: 200,
        };
        let service = |k| if k == 10 { Duration::from_secs(1) } else { MS };
        let corrected = simulate_connection(&schedule, 0, service);
        assert_eq!(corrected.len(), 200);
        // Naive closed-loop timing would see one slow request out of 200 (p99 = 1 ms).
        // Corrected, the ~100 requests due during the stall wait 1000, 990, ... ms.
        let s = summary(&corrected);
        assert!(s.max >= 1_000_000, "{s:?}");
        assert!(s.p50 >= 9_000, "half the run was behind the stall: {s:?}");
        let over_500ms = corrected
            .iter_recorded()
            .filter(|v| v.value_iterated_to() >= 500_000)
            .map(|v| v.count_at_value())
            .sum::<u64>();
        // Request 10 (1000 ms) and requests 11..=65: due at 10k ms, answered at
        // (1091 + k) ms once the backlog drains one per ms, so they waited 1091 - 9k ms.
        assert_eq!(over_500ms, 56);
        // A server that keeps up shows only its service time.
        let steady = summary(&simulate_connection(&schedule, 0, |_| MS));
        assert_eq!((steady.p50, steady.max), (1000, 1000));
    }

    #[test]
    fn added_latency_and_ratios() {
        let direct = Summary {
            count: 1,
            p50: 100,
            p99: 300,
            p999: 900,
            max: 1000,
        };
        let proxy = Summary {
            p50: 250,
            p99: 250,
            p999: 1500,
            ..direct
        };
        assert_eq!(added(&proxy, &direct), [150, -50, 600]);
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(per_core_second(5000, 0.5), Some(10_000.0));
        assert_eq!(cpu_per_thousand(0.5, 5000), Some(0.1));
        assert_eq!(cpu_per_thousand(0.5, 0), None);
    }
}
