//! Streamed blob downloads that can start in the middle (`Range`), for a content store that
//! resumes a blob from the bytes it already has; and the parts of an image config a puller needs.
//!
//! The stream does not hash: the caller owns the partial file and its digest state. What this
//! module guarantees is that the bytes handed out are the blob's bytes from `start` on, as the
//! registry says (`200` = from 0, `206` with a `Content-Range` starting exactly where asked), and
//! that a read waiting longer than the inactivity timeout for its next byte fails instead of
//! hanging.

use std::io::Read;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Ctx, RegistryError};
use crate::manifest::ParseError;
use crate::reference::{check_digest, normalize_platform, sha256_digest, Repository};
use crate::{ctx, header, Manifest, RegistryClient, RequestExtra};

/// A blob's body, being received.
pub struct BlobStream {
    /// `200` (the whole blob, from byte 0) or `206` (from [`BlobStream::start`]).
    pub status: u16,
    /// Offset in the blob of the first byte this stream yields.
    pub start: u64,
    /// Bytes the registry announced for this body (`Content-Length`), when it did.
    pub length: Option<u64>,
    /// The blob's full size, from `Content-Range` of a `206`.
    pub total: Option<u64>,
    reader: ureq::BodyReader<'static>,
    read_timeout: Duration,
    ctx: Ctx,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStream")
            .field("status", &self.status)
            .field("start", &self.start)
            .field("length", &self.length)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl BlobStream {
    /// Read the next bytes; `Ok(0)` at the end of the body. A connection that breaks or stays
    /// silent longer than the inactivity timeout is a [`RegistryError::Transport`] (transient).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, RegistryError> {
        self.reader.read(buf).map_err(|e| {
            let stalled = e.kind() == std::io::ErrorKind::TimedOut
                || e.get_ref()
                    .and_then(|i| i.downcast_ref::<ureq::Error>())
                    .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)));
            if stalled {
                self.ctx.transport(format!(
                    "stalled: no data for {} s; dropping the connection",
                    self.read_timeout.as_secs_f64()
                ))
            } else {
                self.ctx.transport(format!("reading the blob: {e}"))
            }
        })
    }
}

impl RegistryClient {
    /// GET `/v2/<path>/blobs/<digest>` from byte `offset` on (`Range: bytes=<offset>-` when
    /// `offset > 0`), for streaming. A read that gets no byte for `read_timeout` fails; there is
    /// no bound on the whole transfer. The caller checks [`BlobStream::status`]: a `200` to a
    /// ranged request means the registry ignored the range and sends the blob from byte 0.
    /// A `206` whose range does not start at `offset` is refused ([`RegistryError::Malformed`]);
    /// `416` (the range lies beyond the blob) comes back as [`RegistryError::Status`].
    /// `buffer` bounds what one read takes from the socket (a slow reader with small reads keeps
    /// the kernel's receive window small, so a rate limit holds on the wire too).
    pub fn open_blob(
        &self,
        repo: &str,
        digest: &str,
        offset: u64,
        read_timeout: Duration,
        buffer: usize,
    ) -> Result<BlobStream, RegistryError> {
        let repository = Repository::parse(repo)?;
        check_digest(digest).map_err(|message| RegistryError::InvalidReference {
            reference: format!("{repo}@{digest}"),
            message,
        })?;
        let ctx = ctx(&repository, digest);
        let extra = RequestExtra {
            range: (offset > 0).then(|| format!("bytes={offset}-")),
            read_timeout: Some(read_timeout),
            input_buffer: Some(buffer.max(16 * 1024)),
        };
        let resp = self.open(&repository, &ctx, &format!("blobs/{digest}"), None, &extra)?;
        let status = resp.status().as_u16();
        let length = header(&resp, "content-length").and_then(|v| v.parse::<u64>().ok());
        let (start, total) = if status == 206 {
            let cr = header(&resp, "content-range").unwrap_or_default();
            let (start, _end, total) = parse_content_range(&cr).ok_or_else(|| {
                ctx.malformed(format!("206 with an unusable Content-Range {cr:?}"))
            })?;
            if start != offset {
                return Err(ctx.malformed(format!(
                    "asked for bytes from {offset}, the registry sent a range from {start}"
                )));
            }
            (start, total)
        } else {
            (0, None)
        };
        Ok(BlobStream {
            status,
            start,
            length,
            total,
            reader: resp.into_body().into_with_config().reader(),
            read_timeout,
            ctx,
        })
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`) → (start, end, total).
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = b.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, end, total))
}

/// What a puller needs from an image config: the platform it runs on and its layers' diff ids
/// (SHA-256 of each uncompressed layer, bottom first), from which an engine's chain ids follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageConfig {
    /// `os/arch[/variant]`, normalized.
    pub platform: String,
    pub diff_ids: Vec<String>,
}

/// Parse an image config (already digest-checked).
pub fn image_config(bytes: &[u8]) -> Result<ImageConfig, String> {
    #[derive(Deserialize)]
    struct Rootfs {
        #[serde(default)]
        diff_ids: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Config {
        os: Option<String>,
        architecture: Option<String>,
        variant: Option<String>,
        rootfs: Option<Rootfs>,
    }
    let c: Config = serde_json::from_slice(bytes)
        .map_err(|e| format!("image config is not valid JSON: {e}"))?;
    let platform = match (c.os, c.architecture) {
        (Some(os), Some(arch)) if !os.is_empty() && !arch.is_empty() => {
            normalize_platform(&os, &arch, c.variant.as_deref())
        }
        _ => return Err("image config names no os/architecture".into()),
    };
    let diff_ids = c.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    for d in &diff_ids {
        check_digest(d).map_err(|m| format!("image config rootfs.diff_ids: {m}"))?;
    }
    Ok(ImageConfig { platform, diff_ids })
}

impl Manifest {
    /// Parse manifest bytes kept from an earlier fetch, checking them against `digest` again
    /// (what is on disk may have rotted since).
    pub fn from_stored(digest: &str, bytes: Vec<u8>) -> Result<Manifest, String> {
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(format!(
                "stored manifest {digest} hashes to {actual}; discarding it"
            ));
        }
        crate::manifest::parse(actual, bytes, None).map_err(|e| match e {
            ParseError::Unsupported(mt) => format!("unsupported manifest media type {mt:?}"),
            ParseError::Malformed(m) => m,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testserver::{Response, TestServer};
    use std::sync::Arc;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 10-99/100"),
            Some((10, 99, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0, None)));
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range(""), None);
    }

    fn blob_server(data: Arc<Vec<u8>>, honour_range: bool, shift: u64) -> TestServer {
        TestServer::start(move |req| {
            let range = req
                .header("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<usize>().ok());
            match range {
                Some(from) if honour_range => {
                    let from = from + shift as usize;
                    Response::new(206)
                        .header(
                            "Content-Range",
                            &format!("bytes {from}-{}/{}", data.len() - 1, data.len()),
                        )
                        .body(data[from..].to_vec())
                }
                _ => Response::new(200).body(data.to_vec()),
            }
        })
    }

    fn read_all(s: &mut BlobStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn ranged_and_full_streams() {
        let data: Arc<Vec<u8>> = Arc::new((0..5000u32).map(|i| (i % 251) as u8).collect());
        let digest = sha256_digest(&data);
        let srv = blob_server(data.clone(), true, 0);
        let c = RegistryClient::new(vec![], vec![]);
        let repo = format!("{}/x/y", srv.host());
        let mut s = c
            .open_blob(&repo, &digest, 0, Duration::from_secs(5), 65536)
            .unwrap();
        assert_eq!((s.status, s.start, s.length), (200, 0, Some(5000)));
        assert_eq!(read_all(&mut s), *data);
        let mut s = c
            .open_blob(&repo, &digest, 1234, Duration::from_secs(5), 65536)
            .unwrap();
        assert_eq!((s.status, s.start, s.total), (206, 1234, Some(5000)));
        assert_eq!(read_all(&mut s), data[1234..]);
        let reqs = srv.requests();
        assert_eq!(reqs[0].header("range"), None);
        assert_eq!(reqs[1].header("range"), Some("bytes=1234-"));

        // A registry that ignores Range answers 200: the caller sees it and starts over.
        let srv = blob_server(data.clone(), false, 0);
        let repo = format!("{}/x/y", srv.host());
        let s = c
            .open_blob(&repo, &digest, 1234, Duration::from_secs(5), 65536)
            .unwrap();
        assert_eq!((s.status, s.start), (200, 0));

        // A 206 from the wrong offset is refused.
        let srv = blob_server(data.clone(), true, 7);
        let repo = format!("{}/x/y", srv.host());
        let e = c
            .open_blob(&repo, &digest, 100, Duration::from_secs(5), 65536)
            .unwrap_err();
        assert!(e.to_string().contains("sent a range from 107"), "{e}");
        assert!(!e.is_transient());
    }

    #[test]
    fn a_silent_connection_fails_after_the_read_timeout() {
        let srv = TestServer::start(|_| {
            Response::new(200)
                .header("Content-Length", "100000")
                .body(vec![7u8; 1000])
                .stall_after_body(Duration::from_secs(5))
        });
        let c = RegistryClient::new(vec![], vec![]);
        let repo = format!("{}/x/y", srv.host());
        let d = format!("sha256:{}", "a".repeat(64));
        let mut s = c
            .open_blob(&repo, &d, 0, Duration::from_millis(300), 65536)
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = 0;
        let t0 = std::time::Instant::now();
        let err = loop {
            match s.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert_eq!(got, 1000);
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("stalled"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    }

    #[test]
    fn image_configs() {
        let c = image_config(
            br#"{"os":"linux","architecture":"arm","variant":"v7","rootfs":{"type":"layers","diff_ids":["sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]}}"#,
        )
        .unwrap();
        assert_eq!(c.platform, "linux/arm/v7");
        assert_eq!(c.diff_ids.len(), 1);
        assert!(image_config(br#"{"os":"linux"}"#).is_err());
        assert!(image_config(
            br#"{"os":"linux","architecture":"arm64","rootfs":{"diff_ids":["md5:00"]}}"#
        )
        .is_err());
    }

    #[test]
    fn stored_manifests_are_checked_again() {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"digest":"sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","size":1},"layers":[]}"#.to_vec();
        let d = sha256_digest(&body);
        assert!(Manifest::from_stored(&d, body.clone()).is_ok());
        let mut rotten = body;
        rotten[5] ^= 1;
        assert!(Manifest::from_stored(&d, rotten)
            .unwrap_err()
            .contains("hashes to"));
    }
}
