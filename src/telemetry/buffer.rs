//! The store-and-forward buffer: samples taken while the broker is unreachable, on disk under
//! `state_dir/telemetry/buffer.jsonl`, one compact JSON sample per line, oldest first.
//!
//! - A new sample is appended and fsynced (one small write per sample, at most once per
//!   `sample`).
//! - The file never exceeds its byte cap: the oldest samples are dropped first, and how many were
//!   dropped is added to the `dropped` field of the oldest sample that remains, so the controller
//!   learns about the gap in the very next message it gets.
//! - Removing acknowledged samples, and dropping, rewrite the file atomically (temp + fsync +
//!   rename + fsync dir): after a power cut the file holds the old set or the new, never a mix.
//! - A torn last line (a crash mid-append) or any unparsable line is skipped when the buffer is
//!   opened, and the file is rewritten without it.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_protocol::report::Telemetry;
use tracing::{debug, warn};

use crate::fsutil::write_atomic;

pub const FILE_NAME: &str = "buffer.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("telemetry buffer {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("telemetry sample of {size} bytes does not fit the {cap}-byte buffer")]
    TooLarge { size: u64, cap: u64 },
}

struct Entry {
    sample: Telemetry,
    /// Bytes of its line, newline included.
    size: u64,
}

pub struct Buffer {
    path: PathBuf,
    cap: u64,
    entries: VecDeque<Entry>,
    bytes: u64,
    /// Drops not yet carried by an entry (only between dropping and appending in `push`).
    pending_dropped: u64,
}

fn line_of(t: &Telemetry) -> String {
    serde_json::to_string(t).expect("telemetry serializes")
}

impl Buffer {
    /// Open (or create) the buffer in `dir`, capped at `cap` bytes.
    pub fn open(dir: &Path, cap: u64) -> Result<Buffer, BufferError> {
        let io = |source| BufferError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(FILE_NAME);
        let mut b = Buffer {
            path,
            cap,
            entries: VecDeque::new(),
            bytes: 0,
            pending_dropped: 0,
        };
        let text = match std::fs::read(&b.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(b),
            Err(source) => return Err(b.io(source)),
        };
        let mut skipped = 0usize;
        let complete = match text.iter().rposition(|c| *c == b'\n') {
            Some(i) => {
                if i + 1 < text.len() {
                    skipped += 1; // torn tail: a crash during an append
                }
                &text[..=i]
            }
            None => {
                if !text.is_empty() {
                    skipped += 1;
                }
                &text[..0]
            }
        };
        for line in complete.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Telemetry>(line) {
                Ok(sample) => {
                    let size = line.len() as u64 + 1;
                    b.bytes += size;
                    b.entries.push_back(Entry { sample, size });
                }
                Err(_) => skipped += 1,
            }
        }
        let dropped = b.enforce_cap(0);
        if skipped > 0 || dropped > 0 {
            warn!(
                path = %b.path.display(),
                skipped,
                dropped,
                kept = b.entries.len(),
                "telemetry buffer had torn or unreadable lines, or was over its cap; rewriting it"
            );
            b.rewrite()?;
        } else if !b.entries.is_empty() {
            debug!(
                samples = b.entries.len(),
                bytes = b.bytes,
                "telemetry buffer reopened"
            );
        }
        Ok(b)
    }

    fn io(&self, source: std::io::Error) -> BufferError {
        BufferError::Io {
            path: self.path.clone(),
            source,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drop oldest entries until `extra` more bytes fit; the count is carried by the new oldest.
    fn enforce_cap(&mut self, extra: u64) -> u64 {
        let mut dropped = 0u64;
        let mut carried = 0u64;
        while self.bytes + extra > self.cap {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= e.size;
            dropped += 1;
            carried += 1 + e.sample.dropped.unwrap_or(0);
        }
        if carried > 0 {
            if let Some(front) = self.entries.front_mut() {
                front.sample.dropped = Some(front.sample.dropped.unwrap_or(0) + carried);
                let size = line_of(&front.sample).len() as u64 + 1;
                self.bytes = self.bytes - front.size + size;
                front.size = size;
            } else {
                self.pending_dropped = self.pending_dropped.saturating_add(carried);
            }
        }
        dropped
    }

    /// Append a sample. Returns how many old samples were dropped to make room.
    pub fn push(&mut self, mut sample: Telemetry) -> Result<u64, BufferError> {
        let line = line_of(&sample);
        let size = line.len() as u64 + 1;
        // Room for the sample plus the few bytes a `"dropped":N` field adds to it.
        if size + 32 > self.cap {
            return Err(BufferError::TooLarge {
                size,
                cap: self.cap,
            });
        }
        let dropped = self.enforce_cap(size);
        if dropped > 0 {
            if self.entries.is_empty() {
                sample.dropped = Some(sample.dropped.unwrap_or(0) + self.pending_dropped);
                self.pending_dropped = 0;
            }
            let line = line_of(&sample);
            let size = line.len() as u64 + 1;
            self.bytes += size;
            self.entries.push_back(Entry { sample, size });
            self.rewrite()?;
            warn!(
                dropped,
                cap = self.cap,
                "telemetry buffer full; dropped the oldest samples"
            );
            return Ok(dropped);
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        f.write_all(format!("{line}\n").as_bytes())
            .and_then(|_| f.sync_data())
            .map_err(|e| self.io(e))?;
        self.bytes += size;
        self.entries.push_back(Entry { sample, size });
        Ok(0)
    }

    /// The oldest samples: at most `max` of them and, past the first, at most `max_bytes`
    /// serialized.
    pub fn front(&self, max: usize, max_bytes: u64) -> Vec<Telemetry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in self.entries.iter().take(max) {
            if !out.is_empty() && bytes + e.size > max_bytes {
                break;
            }
            bytes += e.size;
            out.push(e.sample.clone());
        }
        out
    }

    /// Forget the `n` oldest samples (after the broker acknowledged them).
    pub fn remove_front(&mut self, n: usize) -> Result<(), BufferError> {
        for _ in 0..n.min(self.entries.len()) {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.size;
            }
        }
        self.rewrite()
    }

    fn rewrite(&mut self) -> Result<(), BufferError> {
        let mut text = String::with_capacity(self.bytes as usize);
        for e in &self.entries {
            text.push_str(&line_of(&e.sample));
            text.push('\n');
        }
        write_atomic(&self.path, text.as_bytes()).map_err(|e| self.io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use ferry_protocol::report::SystemMetrics;
    use std::collections::BTreeMap;

    fn sample(n: u64) -> Telemetry {
        Telemetry {
            device: "dev-001".into(),
            ts: Utc.timestamp_opt(1_700_000_000 + n as i64, 0).unwrap(),
            sensors: [("temperature_c".to_string(), 20.0 + n as f64 / 100.0)].into(),
            system: SystemMetrics {
                uptime_s: n,
                ..Default::default()
            },
            missing: BTreeMap::new(),
            dropped: None,
        }
    }

    fn uptimes(v: &[Telemetry]) -> Vec<u64> {
        v.iter().map(|t| t.system.uptime_s).collect()
    }

    #[test]
    fn keeps_order_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        for n in 0..10 {
            assert_eq!(b.push(sample(n)).unwrap(), 0);
        }
        assert_eq!(uptimes(&b.front(4, u64::MAX)), vec![0, 1, 2, 3]);
        b.remove_front(4).unwrap();
        drop(b);
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        assert_eq!(b.len(), 6);
        assert_eq!(uptimes(&b.front(100, u64::MAX)), vec![4, 5, 6, 7, 8, 9]);
        b.remove_front(6).unwrap();
        assert!(b.is_empty());
        assert_eq!(std::fs::read(b.path()).unwrap(), b"");
        assert!(Buffer::open(d.path(), 1 << 20).unwrap().is_empty());
    }

    #[test]
    fn front_limits_by_count_and_bytes() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        for n in 0..5 {
            b.push(sample(n)).unwrap();
        }
        let one = line_of(&sample(0)).len() as u64 + 1;
        assert_eq!(b.front(10, one * 2 + 4).len(), 2);
        // At least one, however small the byte limit.
        assert_eq!(b.front(10, 1).len(), 1);
        assert_eq!(b.front(3, u64::MAX).len(), 3);
    }

    #[test]
    fn cap_drops_oldest_and_counts_them() {
        let d = tempfile::tempdir().unwrap();
        let one = line_of(&sample(10)).len() as u64 + 1;
        let cap = one * 5 + 40;
        let mut b = Buffer::open(d.path(), cap).unwrap();
        let mut dropped = 0;
        for n in 10..20 {
            dropped += b.push(sample(n)).unwrap();
        }
        assert!(b.bytes() <= cap);
        assert_eq!(dropped as usize + b.len(), 10);
        let kept = b.front(100, u64::MAX);
        // The newest are kept, in order; the oldest kept one carries the count.
        assert_eq!(*uptimes(&kept).last().unwrap(), 19);
        assert_eq!(kept[0].system.uptime_s, 10 + dropped);
        assert_eq!(kept[0].dropped, Some(dropped));
        assert!(kept[1..].iter().all(|t| t.dropped.is_none()));
        // The count is on disk too.
        let b2 = Buffer::open(d.path(), cap).unwrap();
        assert_eq!(b2.front(1, u64::MAX)[0].dropped, Some(dropped));
        assert!(std::fs::metadata(b2.path()).unwrap().len() <= cap);
    }

    #[test]
    fn torn_tail_and_garbage_lines_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        for n in 0..3 {
            b.push(sample(n)).unwrap();
        }
        let path = b.path().to_path_buf();
        drop(b);
        // A crash in the middle of the fourth append, plus a line of garbage.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let torn = line_of(&sample(3));
        f.write_all(b"not json\n").unwrap();
        f.write_all(&torn.as_bytes()[..torn.len() / 2]).unwrap();
        drop(f);
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        assert_eq!(uptimes(&b.front(10, u64::MAX)), vec![0, 1, 2]);
        // The file was repaired: the next append starts on a fresh line.
        b.push(sample(4)).unwrap();
        let b = Buffer::open(d.path(), 1 << 20).unwrap();
        assert_eq!(uptimes(&b.front(10, u64::MAX)), vec![0, 1, 2, 4]);
        // A file that is nothing but a torn line.
        std::fs::write(&path, b"{\"device\":").unwrap();
        assert!(Buffer::open(d.path(), 1 << 20).unwrap().is_empty());
    }

    #[test]
    fn a_lowered_cap_applies_on_open() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        for n in 0..50 {
            b.push(sample(n)).unwrap();
        }
        drop(b);
        let b = Buffer::open(d.path(), 4096).unwrap();
        assert!(b.bytes() <= 4096 && b.len() < 50);
        let first = &b.front(1, u64::MAX)[0];
        assert_eq!(first.dropped, Some(50 - b.len() as u64));
    }
}
