//! Wave specs (`1,10%,100%`: cumulative targets), their [`plan`] for a fleet size, and the
//! per-wave [`FailureThreshold`] (`5%`, `2`): parsed strictly, printed back the same way.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One entry of a wave spec: a cumulative target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WaveTarget {
    /// This many devices in total (>= 1).
    Count(usize),
    /// This percentage (1..=100) of the matched fleet in total; `all` is `100%`.
    Percent(u8),
}

/// Cumulative wave targets such as `1,10%,50%,100%`; serializes as that string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WaveSpec {
    pub(super) targets: Vec<WaveTarget>,
}

/// At most this many failed devices per wave: an absolute count or a percentage of the wave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FailureThreshold {
    Count(usize),
    /// 0..=100.
    Percent(u8),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaveError {
    #[error("empty wave list: give cumulative targets such as `1,10%,50%,100%`")]
    Empty,
    #[error("wave {index} is empty: targets are separated by single commas")]
    EmptyEntry { index: usize },
    #[error("wave {index} (`{entry}`): expected a device count (>= 1), a percentage (1% to 100%) or `all`")]
    BadEntry { index: usize, entry: String },
    #[error("wave {index} (`{entry}`) is below an earlier wave (`{earlier}`): targets are cumulative and must not decrease")]
    Decreasing {
        index: usize,
        entry: String,
        earlier: String,
    },
    #[error("the last wave is `{last}`: it must be `100%` (or `all`) so that the rollout reaches every matched device")]
    NotComplete { last: String },
    #[error("bad failure threshold `{0}`: expected a device count (e.g. `1`) or a percentage of the wave (`0%` to `100%`)")]
    BadThreshold(String),
}

impl fmt::Display for WaveTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveTarget::Count(n) => write!(f, "{n}"),
            WaveTarget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// `N` or `N%` with N a plain decimal number (no sign).
fn parse_amount(s: &str) -> Option<(usize, bool)> {
    let (digits, percent) = match s.strip_suffix('%') {
        Some(d) => (d, true),
        None => (s, false),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, percent))
}

impl WaveSpec {
    pub fn targets(&self) -> &[WaveTarget] {
        &self.targets
    }

    pub fn parse(s: &str) -> Result<WaveSpec, WaveError> {
        s.parse()
    }
}

impl FromStr for WaveSpec {
    type Err = WaveError;

    /// Entries are 1-based in error messages.
    fn from_str(s: &str) -> Result<WaveSpec, WaveError> {
        if s.trim().is_empty() {
            return Err(WaveError::Empty);
        }
        let mut targets: Vec<WaveTarget> = Vec::new();
        for (i, raw) in s.split(',').enumerate() {
            let index = i + 1;
            let entry = raw.trim();
            if entry.is_empty() {
                return Err(WaveError::EmptyEntry { index });
            }
            let bad = || WaveError::BadEntry {
                index,
                entry: entry.to_string(),
            };
            let t = if entry == "all" {
                WaveTarget::Percent(100)
            } else {
                match parse_amount(entry).ok_or_else(bad)? {
                    (n @ 1..=100, true) => WaveTarget::Percent(n as u8),
                    (n @ 1.., false) => WaveTarget::Count(n),
                    _ => return Err(bad()),
                }
            };
            // Counts and percentages only compare once the fleet size is known; `plan` keeps the
            // mixed case monotonic.
            let earlier = targets.iter().find(|e| match (e, &t) {
                (WaveTarget::Count(a), WaveTarget::Count(b)) => a > b,
                (WaveTarget::Percent(a), WaveTarget::Percent(b)) => a > b,
                _ => false,
            });
            if let Some(e) = earlier {
                return Err(WaveError::Decreasing {
                    index,
                    entry: entry.to_string(),
                    earlier: e.to_string(),
                });
            }
            targets.push(t);
        }
        match targets.last() {
            Some(WaveTarget::Percent(100)) => Ok(WaveSpec { targets }),
            _ => Err(WaveError::NotComplete {
                last: s.rsplit(',').next().unwrap_or_default().trim().to_string(),
            }),
        }
    }
}

impl fmt::Display for WaveSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.targets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

impl From<WaveSpec> for String {
    fn from(s: WaveSpec) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for WaveSpec {
    type Error = WaveError;
    fn try_from(s: String) -> Result<WaveSpec, WaveError> {
        s.parse()
    }
}

/// Cumulative device counts per wave for a fleet of `fleet_size` devices.
///
/// Percentages round up (10% of 5 devices is 1 device, so the first wave always has one);
/// counts are capped at the fleet size; a wave that would add no device to the previous ones
/// (`1,10%` on 5 devices, `50,100%` on 10) is dropped, so the result is strictly increasing,
/// every wave has at least one device, and it ends at `fleet_size`. Empty for an empty fleet.
pub fn plan(spec: &WaveSpec, fleet_size: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    if fleet_size == 0 {
        return out;
    }
    for t in &spec.targets {
        let n = match *t {
            WaveTarget::Count(n) => n,
            WaveTarget::Percent(p) => ((fleet_size as u128 * p as u128).div_ceil(100)) as usize,
        };
        let n = n.clamp(1, fleet_size);
        if out.last().is_none_or(|&prev| n > prev) {
            out.push(n);
        }
    }
    out
}

impl FailureThreshold {
    /// Whether `failed` failures in a wave of `wave_size` devices pass the threshold: strictly
    /// more than the count (`1` tolerates one failure, `0` none), or strictly more than the
    /// percentage of the wave (`5%` of 40 devices tolerates 2, of 10 devices none: 1 > 0.5).
    pub fn exceeded(&self, failed: usize, wave_size: usize) -> bool {
        match *self {
            FailureThreshold::Count(n) => failed > n,
            FailureThreshold::Percent(p) => failed as u128 * 100 > p as u128 * wave_size as u128,
        }
    }
}

impl FromStr for FailureThreshold {
    type Err = WaveError;
    fn from_str(s: &str) -> Result<FailureThreshold, WaveError> {
        match parse_amount(s.trim()) {
            Some((n @ 0..=100, true)) => Ok(FailureThreshold::Percent(n as u8)),
            Some((n, false)) => Ok(FailureThreshold::Count(n)),
            _ => Err(WaveError::BadThreshold(s.to_string())),
        }
    }
}

impl fmt::Display for FailureThreshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureThreshold::Count(n) => write!(f, "{n}"),
            FailureThreshold::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl From<FailureThreshold> for String {
    fn from(t: FailureThreshold) -> String {
        t.to_string()
    }
}

impl TryFrom<String> for FailureThreshold {
    type Error = WaveError;
    fn try_from(s: String) -> Result<FailureThreshold, WaveError> {
        s.parse()
    }
}
