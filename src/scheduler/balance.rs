//! Load balancing within one priority tier (SC-2): power of two choices. Two accounts are
//! drawn at random in proportion to their effective capacity, and the one less loaded for its
//! capacity wins.
//!
//! Effective capacity is `concurrency × weight`, divided by a penalty for a high error rate and
//! for a time to first token above the tier's average. Drawing by it makes an idle tier split
//! new sessions by capacity; comparing load by it makes a busy tier even out utilisation, so
//! in both cases load follows capacity and drifts away from slow or failing accounts.

use super::health::Load;

/// One eligible account as the balancer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// `concurrency × weight`.
    pub capacity: f64,
    pub load: Load,
}

/// How much an error rate costs: at 50 % errors an account counts as a third of its size.
const ERROR_PENALTY: f64 = 4.0;

/// Bounds on the time-to-first-token factor, so one slow sample cannot starve an account.
const TTFT_FACTOR: (f64, f64) = (0.5, 3.0);

/// The index of the chosen candidate; `draw()` returns uniform numbers in `[0, 1)`.
pub fn choose(cands: &[Candidate], draw: &mut impl FnMut() -> f64) -> Option<usize> {
    match cands.len() {
        0 => None,
        1 => Some(0),
        _ => {
            let ttft_mean = mean_ttft(cands);
            let effective: Vec<f64> = cands
                .iter()
                .map(|c| c.capacity / penalty(c, ttft_mean))
                .collect();
            let first = weighted(&effective, None, draw);
            let second = weighted(&effective, Some(first), draw);
            let util = |i: usize| cands[i].load.in_flight as f64 / effective[i];
            // Ties go to the first draw, which is already proportional to capacity.
            Some(if util(second) < util(first) {
                second
            } else {
                first
            })
        }
    }
}

fn penalty(c: &Candidate, ttft_mean: Option<f64>) -> f64 {
    let errors = 1.0 + ERROR_PENALTY * c.load.error_rate;
    let slow = match (c.load.ttft_ms, ttft_mean) {
        (Some(t), Some(mean)) if mean > 0.0 => (t / mean).clamp(TTFT_FACTOR.0, TTFT_FACTOR.1),
        _ => 1.0,
    };
    errors * slow
}

fn mean_ttft(cands: &[Candidate]) -> Option<f64> {
    let known: Vec<f64> = cands.iter().filter_map(|c| c.load.ttft_ms).collect();
    (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64)
}

/// Draws an index in proportion to `weights`, skipping `except`.
fn weighted(weights: &[f64], except: Option<usize>, draw: &mut impl FnMut() -> f64) -> usize {
    let total: f64 = weights
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != except)
        .map(|(_, w)| w)
        .sum();
    let mut at = draw() * total;
    let mut last = 0;
    for (i, w) in weights.iter().enumerate() {
        if Some(i) == except {
            continue;
        }
        last = i;
        if at < *w {
            return i;
        }
        at -= w;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(capacity: f64, in_flight: usize) -> Candidate {
        Candidate {
            capacity,
            load: Load {
                in_flight,
                error_rate: 0.0,
                ttft_ms: None,
            },
        }
    }

    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut x = seed.max(1);
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Shares of `n` choices when every chosen turn stays in flight (a busy tier) or none
    /// does (an idle one).
    fn shares(mut cands: Vec<Candidate>, n: usize, busy: bool) -> Vec<f64> {
        let mut draw = rng(7);
        let mut counts = vec![0usize; cands.len()];
        for _ in 0..n {
            let i = choose(&cands, &mut draw).unwrap();
            counts[i] += 1;
            if busy {
                cands[i].load.in_flight += 1;
            }
        }
        counts.iter().map(|c| *c as f64 / n as f64).collect()
    }

    #[test]
    fn sc2_load_follows_capacity_idle_and_busy() {
        for busy in [false, true] {
            let s = shares(vec![cand(8.0, 0), cand(4.0, 0), cand(2.0, 0)], 7000, busy);
            for (got, want) in s.iter().zip([8.0 / 14.0, 4.0 / 14.0, 2.0 / 14.0]) {
                assert!((got - want).abs() < 0.05, "busy={busy}: {s:?}");
            }
        }
    }

    #[test]
    fn sc2_error_rate_and_slowness_push_load_away() {
        let mut failing = cand(4.0, 0);
        failing.load.error_rate = 0.5;
        let s = shares(vec![cand(4.0, 0), failing], 4000, true);
        assert!(s[1] < 0.3, "{s:?}");
        let (mut fast, mut slow) = (cand(4.0, 0), cand(4.0, 0));
        fast.load.ttft_ms = Some(100.0);
        slow.load.ttft_ms = Some(300.0);
        let s = shares(vec![fast, slow], 4000, true);
        assert!(s[0] > 0.6, "{s:?}");
    }

    #[test]
    fn sc2_the_less_loaded_of_two_wins() {
        let mut draw = rng(3);
        for _ in 0..100 {
            assert_eq!(choose(&[cand(4.0, 4), cand(4.0, 0)], &mut draw), Some(1));
        }
        assert_eq!(choose(&[], &mut draw), None);
        assert_eq!(choose(&[cand(1.0, 9)], &mut draw), Some(0));
    }
}
