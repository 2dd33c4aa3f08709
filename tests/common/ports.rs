//! Free TCP ports for listeners that other processes (mosquitto, dockerd, ferryctl) open later.
//! Self-contained so that test binaries without `mod common` can include it by path.

/// A port that was free a moment ago, for a listener started later by another process.
///
/// Not `bind(":0")`: that hands out ports from the kernel's ephemeral range
/// (`ip_local_port_range`, 32768–60999 here), the same range every outgoing connection takes
/// its local port from, so with agents and controllers connecting all around, the port could
/// be an agent's client port by the time mosquitto binds it (it happened in CI). Ports below
/// that range are only ever taken by listeners; pick one at random and check it binds.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut x = seed | 1;
    for _ in 0..1000 {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20_000 + (x % 12_000) as u16; // 20000..32000
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}
