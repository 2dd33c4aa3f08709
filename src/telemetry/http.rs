//! Readings an app serves: `kind = "http"` GETs a JSON object from `url` (plain HTTP, e.g. the
//! app's own endpoint on the box) and takes the number under `field`. No answer, an error status,
//! a body that is not a JSON object, a missing field or a non-number is a [`Missing`] with the
//! reason. Blocking: the sampler runs on a blocking thread.

use std::time::Duration;

use super::sysfs::Missing;

/// The whole request, connect included, must finish in this time.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Bodies larger than this are not readings.
const MAX_BODY: u64 = 64 * 1024;

pub struct HttpReader {
    agent: ureq::Agent,
}

impl Default for HttpReader {
    fn default() -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .max_redirects(0)
            .user_agent(concat!("ferry-agent/", env!("CARGO_PKG_VERSION")))
            .build();
        HttpReader {
            agent: ureq::Agent::new_with_config(config),
        }
    }
}

impl HttpReader {
    pub fn read(&self, url: &str, field: &str) -> Result<f64, Missing> {
        let mut resp = self
            .agent
            .get(url)
            .call()
            .map_err(|e| Missing(format!("GET {url}: {e}")))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(Missing(format!("GET {url}: status {status}")));
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| Missing(format!("GET {url}: reading the body: {e}")))?;
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Missing(format!("GET {url}: not JSON: {e}")))?;
        let value = doc
            .get(field)
            .ok_or_else(|| Missing(format!("{url} serves no {field:?}")))?;
        value
            .as_f64()
            .filter(|v| v.is_finite())
            .ok_or_else(|| Missing(format!("{url}: {field:?} is not a number: {value}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Serve `responses` (raw HTTP) one connection each; returns the URL.
    fn serve(responses: Vec<&'static str>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for r in responses {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(r.as_bytes());
            }
        });
        url
    }

    fn ok(body: &'static str) -> &'static str {
        Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        )
    }

    #[test]
    fn reads_a_field_or_says_why_not() {
        let r = HttpReader::default();
        let url = serve(vec![
            ok(r#"{"app":"sensor","version":"2.0.0","temperature_c":23.25,"humidity_pct":41.5}"#),
            ok(r#"{"app":"sensor","version":"1.0.0","temperature_c":23.25}"#),
            ok(r#"{"humidity_pct":"wet"}"#),
            ok("<html>"),
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ]);
        assert_eq!(r.read(&url, "humidity_pct"), Ok(41.5));
        let m = r.read(&url, "humidity_pct").unwrap_err().0;
        assert!(m.contains("serves no \"humidity_pct\""), "{m}");
        let m = r.read(&url, "humidity_pct").unwrap_err().0;
        assert!(m.contains("not a number"), "{m}");
        let m = r.read(&url, "humidity_pct").unwrap_err().0;
        assert!(m.contains("not JSON"), "{m}");
        let m = r.read(&url, "humidity_pct").unwrap_err().0;
        assert!(m.contains("status 503"), "{m}");
        // Nobody listening any more.
        let m = r.read(&url, "humidity_pct").unwrap_err().0;
        assert!(m.starts_with("GET "), "{m}");
    }
}
