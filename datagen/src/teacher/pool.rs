//! Several endpoints serving the same teacher, balanced by least outstanding requests. An
//! endpoint that fails several times in a row is set aside for a while, then tried again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct State {
    outstanding: usize,
    consecutive_failures: u32,
    set_aside_until: Option<Instant>,
    completed: u64,
    failed: u64,
    latency_ms: Vec<u64>,
}

#[derive(Debug)]
pub struct Pool {
    pub urls: Vec<String>,
    states: Mutex<Vec<State>>,
    /// Failures in a row that set an endpoint aside.
    pub failure_threshold: u32,
    /// How long it stays aside.
    pub cool_down: Duration,
    /// Since when every endpoint has been failing (`None` while one works).
    outage: Mutex<Option<Instant>>,
}

/// Per-endpoint figures for `datagen stats` and the manifest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointReport {
    pub endpoint: String,
    pub completed: u64,
    pub failed: u64,
    pub latency_ms_p50: Option<u64>,
    pub latency_ms_p90: Option<u64>,
}

/// A request's hold on an endpoint; released when dropped.
pub struct Lease<'a> {
    pool: &'a Pool,
    pub index: usize,
    finished: bool,
}

impl Lease<'_> {
    pub fn url(&self) -> &str {
        &self.pool.urls[self.index]
    }

    pub fn succeeded(self, latency_ms: u64) {
        let index = self.index;
        let pool = self.pool;
        self.answered();
        let mut states = pool.states.lock().expect("pool lock");
        states[index].completed += 1;
        states[index].latency_ms.push(latency_ms);
    }

    /// The endpoint answered, but maybe refused the request (a 400 of its own): the endpoint is
    /// healthy (its failure run and any outage end), and nothing is counted as completed.
    pub fn answered(mut self) {
        self.finished = true;
        let mut states = self.pool.states.lock().expect("pool lock");
        let state = &mut states[self.index];
        state.outstanding -= 1;
        state.consecutive_failures = 0;
        state.set_aside_until = None;
        drop(states);
        *self.pool.outage.lock().expect("pool lock") = None;
    }

    pub fn failed(mut self) {
        self.finished = true;
        let mut states = self.pool.states.lock().expect("pool lock");
        let state = &mut states[self.index];
        state.outstanding -= 1;
        state.failed += 1;
        state.consecutive_failures += 1;
        if state.consecutive_failures >= self.pool.failure_threshold {
            state.set_aside_until = Some(Instant::now() + self.pool.cool_down);
        }
        if states.iter().all(|s| s.consecutive_failures >= self.pool.failure_threshold) {
            self.pool.outage.lock().expect("pool lock").get_or_insert_with(Instant::now);
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Cancelled (Ctrl-C, deadline): neither a success nor the endpoint's fault.
            self.pool.states.lock().expect("pool lock")[self.index].outstanding -= 1;
        }
    }
}

impl Pool {
    pub fn new(urls: Vec<String>, failure_threshold: u32, cool_down: Duration) -> Self {
        let states = urls
            .iter()
            .map(|_| State { outstanding: 0, consecutive_failures: 0, set_aside_until: None, completed: 0, failed: 0, latency_ms: Vec::new() })
            .collect();
        Pool { urls, states: Mutex::new(states), failure_threshold: failure_threshold.max(1), cool_down, outage: Mutex::new(None) }
    }

    /// The available endpoint with the fewest requests in flight. When every endpoint is set
    /// aside, the one whose time is up first is tried anyway: a fleet that is all down is
    /// probed, not abandoned.
    pub fn acquire(&self) -> Lease<'_> {
        let now = Instant::now();
        let mut states = self.states.lock().expect("pool lock");
        let available = |s: &State| s.set_aside_until.is_none_or(|until| until <= now);
        let index = (0..states.len())
            .filter(|&i| available(&states[i]))
            .min_by_key(|&i| (states[i].outstanding, i))
            .or_else(|| (0..states.len()).min_by_key(|&i| states[i].set_aside_until))
            .expect("at least one endpoint");
        states[index].outstanding += 1;
        Lease { pool: self, index, finished: false }
    }

    /// Since when every endpoint has failed `failure_threshold` times in a row: an outage of
    /// the teacher, which a success anywhere ends.
    pub fn outage_since(&self) -> Option<Instant> {
        *self.outage.lock().expect("pool lock")
    }

    pub fn report(&self) -> Vec<EndpointReport> {
        let states = self.states.lock().expect("pool lock");
        self.urls
            .iter()
            .zip(states.iter())
            .map(|(url, s)| {
                let mut latencies = s.latency_ms.clone();
                latencies.sort_unstable();
                EndpointReport {
                    endpoint: url.clone(),
                    completed: s.completed,
                    failed: s.failed,
                    latency_ms_p50: percentile(&latencies, 0.5),
                    latency_ms_p90: percentile(&latencies, 0.9),
                }
            })
            .collect()
    }
}

/// The nearest-rank `q` quantile of sorted values (`None` for none).
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_outstanding_and_set_aside() {
        let pool = Pool::new(vec!["a".into(), "b".into()], 2, Duration::from_secs(60));
        let (first, second, third) = (pool.acquire(), pool.acquire(), pool.acquire());
        assert_eq!((first.index, second.index, third.index), (0, 1, 0), "fewest in flight, ties by order");
        drop(third);
        second.succeeded(10);
        let lease = pool.acquire();
        assert_eq!(lease.index, 1, "a still has one in flight");
        lease.succeeded(20);
        first.failed();
        let lease = pool.acquire();
        assert_eq!(lease.index, 0);
        lease.failed(); // a second failure in a row: a is set aside
        for _ in 0..5 {
            let lease = pool.acquire();
            assert_eq!(lease.index, 1, "a is set aside");
            lease.succeeded(30);
        }
        let report = pool.report();
        assert_eq!((report[0].failed, report[1].completed, report[1].latency_ms_p50), (2, 7, Some(30)));
    }
}
