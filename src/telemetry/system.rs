//! System metrics: CPU %, memory, free disk under the state dir and Docker's data root, uptime,
//! load. CPU % is the average since the previous sample (sysinfo compares two refreshes).

use std::collections::BTreeMap;
use std::path::PathBuf;

use ferry_protocol::report::SystemMetrics;

use crate::download::disk::free_bytes_near;

pub struct SystemSampler {
    sys: Option<sysinfo::System>,
    state_dir: PathBuf,
    docker_root: Option<String>,
}

impl SystemSampler {
    /// `docker_root` is Docker's data root (`docker info`'s DockerRootDir) when known.
    pub fn new(state_dir: PathBuf, docker_root: Option<String>) -> SystemSampler {
        let sys = match sysinfo::System::new() {
            Ok(mut s) => {
                s.refresh_cpu_usage();
                Some(s)
            }
            Err(e) => {
                tracing::warn!(error = %e, "sysinfo unavailable; CPU and memory report 0");
                None
            }
        };
        SystemSampler {
            sys,
            state_dir,
            docker_root: docker_root.filter(|r| !r.is_empty()),
        }
    }

    pub fn sample(&mut self) -> SystemMetrics {
        let mut m = SystemMetrics::default();
        if let Some(sys) = self.sys.as_mut() {
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            m.cpu_pct = round_to(f64::from(sys.global_cpu_usage()), 10.0);
            m.mem_used_bytes = sys.used_memory();
            m.mem_total_bytes = sys.total_memory();
        }
        m.uptime_s = sysinfo::System::uptime().unwrap_or(0);
        m.disk_free_bytes = free_bytes_near(&self.state_dir).unwrap_or(0);
        let mut extra = BTreeMap::new();
        if let Some(root) = &self.docker_root {
            if let Some(free) = free_bytes_near(std::path::Path::new(root)) {
                extra.insert("docker_disk_free_bytes".to_string(), free.into());
            }
        }
        if let Ok(load) = sysinfo::System::load_average() {
            extra.insert("load1".to_string(), round_to(load.one, 100.0).into());
        }
        m.extra = extra;
        m
    }
}

fn round_to(v: f64, per: f64) -> f64 {
    if v.is_finite() {
        (v * per).round() / per
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_machine() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SystemSampler::new(d.path().to_path_buf(), Some("/".into()));
        let m = s.sample();
        assert!(
            m.mem_total_bytes > 0 && m.mem_used_bytes <= m.mem_total_bytes,
            "{m:?}"
        );
        assert!(m.disk_free_bytes > 0);
        assert!(m.uptime_s > 0);
        assert!((0.0..=100.0).contains(&m.cpu_pct));
        assert!(m.extra["docker_disk_free_bytes"].as_u64().unwrap() > 0);
        assert!(m.extra["load1"].as_f64().unwrap() >= 0.0);
        // No Docker root known: no docker_disk_free_bytes.
        let m = SystemSampler::new(d.path().to_path_buf(), Some(String::new())).sample();
        assert!(!m.extra.contains_key("docker_disk_free_bytes"));
    }
}
