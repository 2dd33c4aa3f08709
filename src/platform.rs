//! The platform this agent runs on, in OCI notation (`linux/arm64`, `linux/arm/v7`, ...).

/// The platform of the running binary. An armv7 build reports `linux/arm/v7`.
pub fn detect() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "linux/arm64",
        "arm" => "linux/arm/v7",
        "x86_64" => "linux/amd64",
        "x86" => "linux/386",
        "riscv64" => "linux/riscv64",
        "powerpc64" => "linux/ppc64le",
        "s390x" => "linux/s390x",
        _ => "linux/unknown",
    }
}

/// Split `os/arch[/variant]`.
pub fn split(p: &str) -> (&str, &str, Option<&str>) {
    let mut it = p.splitn(3, '/');
    let os = it.next().unwrap_or("");
    let arch = it.next().unwrap_or("");
    (os, arch, it.next())
}

#[cfg(test)]
mod tests {
    #[test]
    fn detects_known_platform() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(super::detect(), "linux/amd64");
        #[cfg(target_arch = "aarch64")]
        assert_eq!(super::detect(), "linux/arm64");
        #[cfg(target_arch = "arm")]
        assert_eq!(super::detect(), "linux/arm/v7");
        assert_eq!(super::split("linux/arm/v7"), ("linux", "arm", Some("v7")));
    }
}
