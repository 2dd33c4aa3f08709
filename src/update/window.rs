//! Local maintenance windows (`[update] windows = ["02:00-04:00"]`, the box's local time): the
//! switch of a downloaded update waits until one is open. A window whose end is before its start
//! spans midnight (`"22:00-02:00"`). Seconds may be given (`"02:00:30-02:10"`). No windows:
//! always open.

use std::str::FromStr;
use std::time::Duration;

use chrono::{NaiveTime, Timelike};

const DAY: u32 = 86_400;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Seconds after local midnight; `end` exclusive.
    start: u32,
    end: u32,
}

/// `HH:MM` or `HH:MM:SS` → seconds after midnight (`24:00` ends a day).
fn hhmm(s: &str) -> Option<u32> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
        return None;
    }
    let n: Vec<u32> = parts
        .iter()
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let (h, m, sec) = (n[0], n[1], n.get(2).copied().unwrap_or(0));
    (h < 24 && m < 60 && sec < 60 || h == 24 && m == 0 && sec == 0)
        .then_some(h * 3600 + m * 60 + sec)
}

impl FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> Result<Window, String> {
        let bad =
            || format!("{s:?} is not a window like \"02:00-04:00\" (local time, HH:MM-HH:MM)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (start, end) = (hhmm(a).ok_or_else(bad)?, hhmm(b).ok_or_else(bad)?);
        if start == end || start == DAY {
            return Err(format!("{s:?} is empty"));
        }
        Ok(Window { start, end })
    }
}

fn fmt_time(f: &mut std::fmt::Formatter<'_>, t: u32) -> std::fmt::Result {
    write!(f, "{:02}:{:02}", t / 3600, (t % 3600) / 60)?;
    if t % 60 != 0 {
        write!(f, ":{:02}", t % 60)?;
    }
    Ok(())
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_time(f, self.start)?;
        f.write_str("-")?;
        fmt_time(f, self.end)
    }
}

impl Window {
    fn contains(&self, t: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&t)
        } else {
            t >= self.start || t < self.end
        }
    }

    /// Seconds from `now` (seconds after local midnight) until this window opens next.
    fn opens_in(&self, now_s: u32) -> u32 {
        (self.start + DAY - now_s % DAY) % DAY
    }
}

/// `None` when a window is open at local time `now` (or there are none); otherwise the wait
/// until the next one opens and that window.
pub fn wait_for(windows: &[Window], now: NaiveTime) -> Option<(Duration, Window)> {
    if windows.is_empty() {
        return None;
    }
    let now_s = now.num_seconds_from_midnight();
    if windows.iter().any(|w| w.contains(now_s)) {
        return None;
    }
    windows
        .iter()
        .map(|w| (Duration::from_secs(u64::from(w.opens_in(now_s))), *w))
        .min_by_key(|(d, _)| *d)
}

/// "3 h 05 min", "12 min", "40 s".
pub fn human_wait(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{} min", s.div_ceil(60))
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    #[test]
    fn parse_and_print() {
        let w: Window = "02:00-04:30".parse().unwrap();
        assert_eq!(w.to_string(), "02:00-04:30");
        assert_eq!(
            "22:00-24:00".parse::<Window>().unwrap().to_string(),
            "22:00-24:00"
        );
        assert_eq!(
            "02:00:30-02:10".parse::<Window>().unwrap().to_string(),
            "02:00:30-02:10"
        );
        for bad in [
            "2:00-4:00",
            "02:00",
            "25:00-01:00",
            "02:00-02:00",
            "ab:cd-01:00",
            "24:00-01:00",
            "02:00:60-03:00",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
    }

    #[test]
    fn open_or_how_long_until() {
        let ws = vec![
            "02:00-04:00".parse().unwrap(),
            "22:00-23:00".parse().unwrap(),
        ];
        assert_eq!(wait_for(&ws, t(3, 0)), None);
        assert_eq!(wait_for(&ws, t(22, 30)), None);
        let (d, w) = wait_for(&ws, t(12, 0)).unwrap();
        assert_eq!(
            (d, w.to_string()),
            (Duration::from_secs(10 * 3600), "22:00-23:00".into())
        );
        let (d, w) = wait_for(&ws, t(23, 0)).unwrap();
        assert_eq!(
            (d, w.to_string()),
            (Duration::from_secs(3 * 3600), "02:00-04:00".into())
        );
        assert_eq!(wait_for(&[], t(12, 0)), None);
        // Across midnight.
        let night = vec!["22:00-02:00".parse().unwrap()];
        assert_eq!(wait_for(&night, t(1, 59)), None);
        assert_eq!(wait_for(&night, t(23, 0)), None);
        assert_eq!(
            wait_for(&night, t(2, 0)).unwrap().0,
            Duration::from_secs(20 * 3600)
        );
        let secs = vec!["12:00:30-12:01".parse().unwrap()];
        assert_eq!(
            wait_for(&secs, NaiveTime::from_hms_opt(12, 0, 10).unwrap())
                .unwrap()
                .0,
            Duration::from_secs(20)
        );
        assert_eq!(
            wait_for(&secs, NaiveTime::from_hms_opt(12, 0, 30).unwrap()),
            None
        );
        assert_eq!(
            human_wait(Duration::from_secs(3 * 3600 + 300)),
            "3 h 05 min"
        );
        assert_eq!(human_wait(Duration::from_secs(61)), "2 min");
    }

    proptest! {
        /// Waiting the returned time always lands inside a window (at its start).
        #[test]
        fn the_wait_ends_in_a_window(start in 0u32..DAY, len in 1u32..DAY, now in 0u32..DAY) {
            let end = (start + len) % DAY;
            prop_assume!(end != start);
            let w = Window { start, end: if end == 0 { DAY } else { end } };
            let now_t = NaiveTime::from_num_seconds_from_midnight_opt(now, 0).unwrap();
            match wait_for(&[w], now_t) {
                None => prop_assert!(w.contains(now)),
                Some((d, _)) => {
                    prop_assert!(!w.contains(now));
                    let at = (now + d.as_secs() as u32) % DAY;
                    prop_assert!(w.contains(at));
                    prop_assert!(d.as_secs() < u64::from(DAY));
                }
            }
        }
    }
}
