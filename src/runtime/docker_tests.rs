//! Unit tests of `docker.rs`.

use super::*;
use crate::runtime::{BindMount, PortMapping};
use bollard::models::{
    ContainerConfig as DockerContainerConfig, ContainerState as DockerState,
    ContainerStateStatusEnum, EndpointSettings, Health, NetworkSettings,
};

#[test]
fn an_agent_owns_its_namespaced_and_its_pre_namespace_loopback_names_only() {
    let ns = "ferry-0123456789ab";
    let d = "@sha256:47b0";
    assert!(owned_name(
        &format!("127.0.0.1:35271/{ns}/ferry/sensor{d}"),
        ns
    ));
    assert!(owned_name(&format!("localhost:5000/{ns}/sensor{d}"), ns));
    // Names from an agent before namespaces: still its own.
    assert!(owned_name(&format!("127.0.0.1:40001/ferry/sensor{d}"), ns));
    // Another device's agent on the same engine.
    assert!(!owned_name(
        &format!("127.0.0.1:35272/ferry-ba9876543210/ferry/sensor{d}"),
        ns
    ));
    // The operator's names, from a real registry.
    assert!(!owned_name(
        &format!("registry.example.com/{ns}/sensor{d}"),
        ns
    ));
    assert!(!owned_name(&format!("docker.io/library/nginx{d}"), ns));
    assert!(!owned_name("nginx", ns));
}

#[test]
fn an_update_refused_between_two_restarts_is_retried_and_others_are_not() {
    // The two wordings the engine uses when a crash-looping container's task is gone
    // between restarts (seen on 20.10 and on later engines in CI).
    assert!(between_restarts(
        "Docker responded with status code 500: Cannot update container abc: runc did not \
         terminate successfully: container not running"
    ));
    assert!(between_restarts(
        "Docker responded with status code 500: Cannot update container abc: cannot \
         update a stopped container: unknown"
    ));
    assert!(!between_restarts("No such container: abc"));
    assert!(!between_restarts(
        "Cannot update container abc: removal of container abc is already in progress"
    ));
}

fn sample_config() -> ContainerConfig {
    ContainerConfig {
        name: "ferry-dev-sensor-s2".into(),
        image: "r:5000/ferry/sensor@sha256:abc".into(),
        cmd: Some(vec!["/bin/sensor".into(), "--port".into(), "8080".into()]),
        env: BTreeMap::from([("A".into(), "1".into()), ("B".into(), "x=y".into())]),
        ports: vec![
            PortMapping {
                host: 18080,
                container: 8080,
                proto: "tcp".into(),
            },
            PortMapping {
                host: 15353,
                container: 53,
                proto: "udp".into(),
            },
        ],
        port_address: None,
        binds: vec![
            BindMount {
                host: "/var/lib/ferry-apps/sensor".into(),
                container: "/data".into(),
                read_only: false,
            },
            BindMount {
                host: "/etc/ferry".into(),
                container: "/cfg".into(),
                read_only: true,
            },
        ],
        devices: vec!["/dev/i2c-1".into()],
        privileged: false,
        network_mode: None,
        labels: BTreeMap::from([("io.ferry.app".into(), "sensor".into())]),
        restart_policy: RestartPolicy::No,
        platform: Some("linux/arm64".into()),
        memory_bytes: Some(256 << 20),
        pids_limit: Some(512),
    }
}

#[test]
fn create_body_maps_every_field() {
    let body = create_body(&sample_config());
    let limits = body.host_config.as_ref().unwrap();
    assert_eq!(limits.memory, Some(256 << 20));
    assert_eq!(
        limits.memory_swap,
        Some(256 << 20),
        "no swap beyond the limit"
    );
    assert_eq!(limits.pids_limit, Some(512));
    assert_eq!(
        body.image.as_deref(),
        Some("r:5000/ferry/sensor@sha256:abc")
    );
    assert_eq!(
        body.cmd,
        Some(vec!["/bin/sensor".into(), "--port".into(), "8080".into()])
    );
    assert_eq!(body.env, Some(vec!["A=1".into(), "B=x=y".into()]));
    assert_eq!(
        body.labels.unwrap().get("io.ferry.app").map(String::as_str),
        Some("sensor")
    );
    let mut exposed = body.exposed_ports.unwrap();
    exposed.sort();
    assert_eq!(exposed, vec!["53/udp".to_string(), "8080/tcp".to_string()]);
    let hc = body.host_config.unwrap();
    let pb = hc.port_bindings.unwrap();
    let b = pb["8080/tcp"].as_ref().unwrap();
    assert_eq!(b[0].host_ip.as_deref(), Some("0.0.0.0"));
    assert_eq!(b[0].host_port.as_deref(), Some("18080"));
    assert_eq!(
        pb["53/udp"].as_ref().unwrap()[0].host_port.as_deref(),
        Some("15353")
    );
    assert!(hc.binds.is_none(), "never bind strings");
    let m = hc.mounts.unwrap();
    let seen: Vec<_> = m
        .iter()
        .map(|m| {
            (
                m.source.as_deref().unwrap(),
                m.target.as_deref().unwrap(),
                m.read_only,
                m.typ,
                m.bind_options.as_ref().unwrap().propagation,
            )
        })
        .collect();
    let private = Some(MountBindOptionsPropagationEnum::RPRIVATE);
    assert_eq!(
        seen,
        vec![
            (
                "/var/lib/ferry-apps/sensor",
                "/data",
                Some(false),
                Some(MountType::BIND),
                private
            ),
            (
                "/etc/ferry",
                "/cfg",
                Some(true),
                Some(MountType::BIND),
                private
            ),
        ]
    );
    let dev = &hc.devices.unwrap()[0];
    assert_eq!(dev.path_on_host.as_deref(), Some("/dev/i2c-1"));
    assert_eq!(dev.path_in_container.as_deref(), Some("/dev/i2c-1"));
    assert_eq!(dev.cgroup_permissions.as_deref(), Some("rwm"));
    assert_eq!(hc.privileged, Some(false));
    assert_eq!(hc.network_mode.as_deref(), Some("bridge"));
    assert_eq!(
        hc.restart_policy.unwrap().name,
        Some(RestartPolicyNameEnum::NO)
    );
}

#[test]
fn create_body_minimal_and_host_network() {
    let cfg = ContainerConfig {
        name: "x".into(),
        image: "img".into(),
        network_mode: Some("host".into()),
        privileged: true,
        ..Default::default()
    };
    let body = create_body(&cfg);
    assert_eq!(body.env, None);
    assert_eq!(body.exposed_ports, None);
    assert_eq!(body.cmd, None);
    let hc = body.host_config.unwrap();
    assert_eq!(hc.network_mode.as_deref(), Some("host"));
    assert_eq!(hc.privileged, Some(true));
    assert!(hc.port_bindings.is_none() && hc.binds.is_none() && hc.devices.is_none());
    assert_eq!(
        hc.restart_policy.unwrap().name,
        Some(RestartPolicyNameEnum::UNLESS_STOPPED)
    );
    // The serialized form uses the daemon's map shape for exposed ports.
    let json = serde_json::to_value(create_body(&sample_config())).unwrap();
    assert_eq!(json["ExposedPorts"]["8080/tcp"], serde_json::json!({}));
    assert_eq!(json["HostConfig"]["RestartPolicy"]["Name"], "no");
}

#[test]
fn container_info_from_inspect() {
    let r = ContainerInspectResponse {
        id: Some("abc".into()),
        name: Some("/ferry-dev-sensor".into()),
        image: Some("sha256:img".into()),
        restart_count: Some(3),
        state: Some(DockerState {
            status: Some(ContainerStateStatusEnum::RUNNING),
            running: Some(true),
            exit_code: Some(0),
            started_at: Some("2026-01-01T00:00:00Z".into()),
            health: Some(Health {
                status: Some(HealthStatusEnum::HEALTHY),
                ..Default::default()
            }),
            ..Default::default()
        }),
        config: Some(DockerContainerConfig {
            image: Some("repo@sha256:d".into()),
            labels: Some(HashMap::from([("k".into(), "v".into())])),
            ..Default::default()
        }),
        host_config: Some(HostConfig {
            network_mode: Some("default".into()),
            port_bindings: Some(HashMap::from([
                (
                    "8080/tcp".to_string(),
                    Some(vec![PortBinding {
                        host_ip: Some("0.0.0.0".into()),
                        host_port: Some("18080".into()),
                    }]),
                ),
                (
                    "53/udp".to_string(),
                    Some(vec![PortBinding {
                        host_ip: None,
                        host_port: Some("53".into()),
                    }]),
                ),
            ])),
            restart_policy: Some(docker_restart_policy(RestartPolicy::UnlessStopped)),
            ..Default::default()
        }),
        network_settings: Some(NetworkSettings {
            networks: Some(HashMap::from([
                ("a-empty".to_string(), EndpointSettings::default()),
                (
                    "bridge".to_string(),
                    EndpointSettings {
                        ip_address: Some("172.17.0.2".into()),
                        ..Default::default()
                    },
                ),
            ])),
            ..Default::default()
        }),
        ..Default::default()
    };
    let i = container_info(r);
    assert_eq!(i.id, "abc");
    assert_eq!(i.name, "ferry-dev-sensor");
    assert_eq!(i.image, "repo@sha256:d");
    assert_eq!(i.image_id, "sha256:img");
    assert_eq!(i.labels.get("k").map(String::as_str), Some("v"));
    assert_eq!(i.state.status, "running");
    assert!(i.state.running);
    assert_eq!(i.state.exit_code, None);
    assert_eq!(i.state.restart_count, 3);
    assert_eq!(i.state.health.as_deref(), Some("healthy"));
    assert_eq!(i.ip_address.as_deref(), Some("172.17.0.2"));
    assert_eq!(i.host_ports, BTreeMap::from([(8080, 18080)]));
    assert_eq!(i.network_mode, "bridge");
    assert_eq!(i.restart_policy, RestartPolicy::UnlessStopped);
}

#[test]
fn container_info_exited_never_started() {
    let r = ContainerInspectResponse {
        state: Some(DockerState {
            status: Some(ContainerStateStatusEnum::EXITED),
            running: Some(false),
            exit_code: Some(137),
            started_at: Some("0001-01-01T00:00:00Z".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let i = container_info(r);
    assert_eq!(i.state.exit_code, Some(137));
    assert_eq!(i.state.started_at, None);
    assert_eq!(i.state.health, None);
    assert_eq!(i.restart_policy, RestartPolicy::No);
}

#[test]
fn pull_tracker_sums_layers() {
    let mut t = PullTracker::default();
    assert!(
        !t.update(Some("sha256:x"), "Pulling from ferry/sensor", None, None) && t.layers.is_empty()
    );
    t.update(Some("a"), "Pulling fs layer", None, None);
    t.update(Some("b"), "Pulling fs layer", None, None);
    t.update(Some("a"), "Downloading", Some(100), Some(1000));
    t.update(Some("b"), "Downloading", Some(50), Some(500));
    assert_eq!(
        t.sum(),
        PullProgress {
            bytes: 150,
            total: 1500
        }
    );
    t.update(Some("a"), "Downloading", Some(700), Some(1000));
    assert_eq!(
        t.sum(),
        PullProgress {
            bytes: 750,
            total: 1500
        }
    );
    t.update(Some("a"), "Download complete", None, None);
    // Extracting reports its own current/total: not download bytes.
    t.update(Some("a"), "Extracting", Some(10), Some(1000));
    assert_eq!(
        t.sum(),
        PullProgress {
            bytes: 1050,
            total: 1500
        }
    );
    t.update(Some("b"), "Pull complete", None, None);
    t.update(Some("c"), "Already exists", None, None);
    assert_eq!(
        t.sum(),
        PullProgress {
            bytes: 1500,
            total: 1500
        }
    );
    // A layer that completed without any Downloading message counts what it saw.
    t.update(Some("d"), "Downloading", Some(30), None);
    t.update(Some("d"), "Download complete", None, None);
    assert_eq!(
        t.sum(),
        PullProgress {
            bytes: 1530,
            total: 1530
        }
    );
}

#[test]
fn errors_keep_context_and_daemon_message() {
    let e = map_error(
        "/s",
        "create",
        "c1",
        BollardError::DockerResponseServerError {
            status_code: 409,
            message: "Conflict. The container name \"/c1\" is already in use".into(),
        },
        REQUEST_TIMEOUT,
    );
    assert_eq!(
        e.to_string(),
        "create c1: Conflict. The container name \"/c1\" is already in use"
    );
    let e = map_error(
        "/s",
        "start",
        "c1",
        BollardError::DockerResponseServerError {
            status_code: 404,
            message: "No such container: c1".into(),
        },
        REQUEST_TIMEOUT,
    );
    assert!(matches!(e, RuntimeError::NotFound { op: "start", .. }));
    let e = map_error(
        "/s",
        "pull",
        "r@sha256:1",
        BollardError::DockerStreamError {
            error: "manifest unknown".into(),
        },
        REQUEST_TIMEOUT,
    );
    assert_eq!(e.to_string(), "pull r@sha256:1: manifest unknown");
    let e = map_error(
        "/s",
        "info",
        "/s",
        BollardError::RequestTimeoutError,
        REQUEST_TIMEOUT,
    );
    assert!(matches!(e, RuntimeError::Timeout { after, .. } if after == REQUEST_TIMEOUT));
    let e = map_error(
        "/s",
        "info",
        "/s",
        BollardError::SocketNotFoundError("/s".into()),
        REQUEST_TIMEOUT,
    );
    assert!(matches!(e, RuntimeError::Unreachable { .. }));
}

#[test]
fn tcp_port_parsing() {
    assert_eq!(tcp_port("8080/tcp"), Some(8080));
    assert_eq!(tcp_port("53/udp"), None);
    assert_eq!(tcp_port("x/tcp"), None);
}
