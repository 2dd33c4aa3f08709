//! `--pull-delay` / `--health-delay`: a fixed duration (`2s`, `500ms`) or a uniform range
//! (`1s..3s`, the jitter).

use std::time::Duration;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delay {
    pub min: Duration,
    pub max: Duration,
}

impl Delay {
    pub fn parse(s: &str) -> Result<Delay, String> {
        let one = |t: &str| -> Result<Duration, String> {
            let t = t.trim();
            if t == "0" {
                return Ok(Duration::ZERO);
            }
            humantime::parse_duration(t)
                .map_err(|e| format!("{t:?} is not a duration like 500ms or 2s: {e}"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (one(a)?, one(b)?),
            None => {
                let d = one(s)?;
                (d, d)
            }
        };
        if max < min {
            return Err(format!("{s:?}: the range ends before it starts"));
        }
        Ok(Delay { min, max })
    }

    /// A duration drawn uniformly from the range.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> Duration {
        if self.max == self.min {
            return self.min;
        }
        let span = (self.max - self.min).as_micros() as u64;
        self.min + Duration::from_micros(rng.u64(0..=span))
    }

    pub fn is_zero(&self) -> bool {
        self.max.is_zero()
    }
}

impl std::fmt::Display for Delay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{:?}", self.min)
        } else {
            write!(f, "{:?}..{:?}", self.min, self.max)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fixed_and_ranges() {
        assert_eq!(Delay::parse("0").unwrap(), Delay::default());
        let d = Delay::parse("2s").unwrap();
        assert_eq!(
            (d.min, d.max),
            (Duration::from_secs(2), Duration::from_secs(2))
        );
        let d = Delay::parse("500ms..1500ms").unwrap();
        assert_eq!(
            (d.min, d.max),
            (Duration::from_millis(500), Duration::from_millis(1500))
        );
        assert!(Delay::parse("3s..1s").is_err());
        assert!(Delay::parse("soon").is_err());
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..100 {
            let s = d.sample(&mut rng);
            assert!(s >= d.min && s <= d.max);
        }
    }
}
