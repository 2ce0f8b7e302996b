//! Latency summaries.

/// Percentiles of a set of measurements (nearest rank: the smallest value
/// with at least p % of the values at or below it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub count: usize,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: u64,
}

pub fn summarize(values: &[u64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = |p: u64| {
        // ceil(p/100 · n), at least 1, as an index.
        let n = sorted.len() as u64;
        let k = (p * n).div_ceil(100).max(1);
        sorted[(k - 1) as usize]
    };
    let sum: u128 = sorted.iter().map(|&v| u128::from(v)).sum();
    Some(Summary {
        count: sorted.len(),
        p50: rank(50),
        p90: rank(90),
        p99: rank(99),
        max: *sorted.last().expect("not empty"),
        mean: (sum / sorted.len() as u128) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u64> = (1..=100).rev().collect();
        let s = summarize(&values).unwrap();
        assert_eq!(
            (s.count, s.p50, s.p90, s.p99, s.max, s.mean),
            (100, 50, 90, 99, 100, 50)
        );
        // 1,000 values: p99 is the 990th smallest.
        let values: Vec<u64> = (1..=1000).collect();
        let s = summarize(&values).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.max), (500, 900, 990, 1000));
        // Few values: p99 of 3 is the largest, p50 the middle one.
        let s = summarize(&[30, 10, 20]).unwrap();
        assert_eq!((s.p50, s.p99, s.max, s.mean), (20, 30, 30, 20));
        let s = summarize(&[7]).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.max), (7, 7, 7, 7));
        assert_eq!(summarize(&[]), None);
    }
}
