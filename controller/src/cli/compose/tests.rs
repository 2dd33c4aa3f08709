//! Compose files as people write them (the shapes Docker's documentation shows), and the keys
//! Ferry refuses, each with its line.

use super::*;

fn opts() -> ComposeOptions {
    ComposeOptions {
        bind_prefixes: vec!["/var/lib/ferry-apps".into()],
        ..ComposeOptions::default()
    }
}

fn one(text: &str) -> ReleaseSpec {
    let apps = parse(text, &opts()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(apps.len(), 1, "{apps:?}");
    apps.into_iter().next().unwrap().spec
}

fn refused(text: &str) -> ComposeError {
    match parse(text, &opts()) {
        Ok(apps) => panic!("accepted: {apps:?}"),
        Err(e) => e,
    }
}

/// A web app with a healthcheck, in the shape of Docker's healthcheck reference.
const WEB: &str = r#"
services:
  web:
    image: registry.example/acme/web:1.4.2
    command: ["/usr/bin/web", "--port", "8080"]
    ports:
      - "80:8080"
      - "127.0.0.1:9000:9000/udp"
    environment:
      LOG_LEVEL: info
      WORKERS: 4
      GREETING: "cost: $$5"
    volumes:
      - /var/lib/ferry-apps/web:/data
      - type: bind
        source: /var/lib/ferry-apps/web/conf
        target: /etc/web
        read_only: true
    healthcheck:
      test: ["CMD", "curl", "-f", "http://localhost:8080/healthz"]
      interval: 1m30s
      timeout: 10s
      retries: 3
      start_period: 40s
    restart: unless-stopped
    mem_limit: 256m
    pids_limit: 100
"#;

#[test]
fn a_web_app_with_a_healthcheck_becomes_one_release() {
    let e = parse(WEB, &opts()).unwrap_err();
    // The address is refused: Ferry publishes on every address.
    assert_eq!(e.line, 8, "{e}");
    assert!(
        e.path == "services.web.ports[1]" && e.detail.contains("127.0.0.1"),
        "{e}"
    );

    let s = one(&WEB.replace("127.0.0.1:9000:9000/udp", "9000:9000/udp"));
    assert_eq!(s.app, "web");
    assert_eq!(s.version, semver::Version::new(1, 4, 2));
    assert_eq!(s.image, "registry.example/acme/web:1.4.2");
    let c = &s.container;
    assert_eq!(
        c.cmd.as_deref(),
        Some(&["/usr/bin/web".to_string(), "--port".into(), "8080".into()][..])
    );
    assert_eq!(
        c.ports,
        vec![
            PortSpec {
                host: 80,
                container: 8080,
                proto: Proto::Tcp
            },
            PortSpec {
                host: 9000,
                container: 9000,
                proto: Proto::Udp
            },
        ]
    );
    assert_eq!(c.env["WORKERS"], "4");
    assert_eq!(c.env["GREETING"], "cost: $5");
    assert_eq!(
        c.binds,
        vec![
            BindSpec {
                host: "/var/lib/ferry-apps/web".into(),
                container: "/data".into(),
                read_only: false
            },
            BindSpec {
                host: "/var/lib/ferry-apps/web/conf".into(),
                container: "/etc/web".into(),
                read_only: true
            },
        ]
    );
    assert_eq!(c.memory_mb, Some(256));
    assert_eq!(c.pids, Some(100));
    assert_eq!(
        s.health,
        HealthSpec {
            check: Some(HealthCheck::Exec(vec![
                "curl".into(),
                "-f".into(),
                "http://localhost:8080/healthz".into()
            ])),
            interval_s: Some(90),
            timeout_s: Some(10),
            max_failures: Some(3),
            grace_s: Some(40),
            ..HealthSpec::default()
        }
    );
}

#[test]
fn every_service_is_an_app_and_one_can_be_picked() {
    let text = "version: \"3.8\"\nx-common: &common\n  restart: always\nservices:\n  api:\n    <<: *common\n    image: r.example/api:2.0.0\n  worker:\n    <<: *common\n    image: r.example/worker@sha256:0000000000000000000000000000000000000000000000000000000000000000\n";
    let o = ComposeOptions {
        version: Some(semver::Version::new(7, 1, 0)),
        ..opts()
    };
    let apps = parse(text, &o).unwrap();
    assert_eq!(
        apps.iter()
            .map(|a| (a.service.as_str(), a.spec.version.to_string()))
            .collect::<Vec<_>>(),
        vec![("api", "7.1.0".into()), ("worker", "7.1.0".into())]
    );
    let picked = parse(
        text,
        &ComposeOptions {
            service: Some("api".into()),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(picked.len(), 1);
    assert_eq!(picked[0].spec.version.to_string(), "2.0.0");
    // The worker's digest is no version: --version is needed.
    let e = parse(text, &opts()).unwrap_err();
    assert!(e.line == 10 && e.detail.contains("--version"), "{e}");
    let e = parse(
        text,
        &ComposeOptions {
            service: Some("db".into()),
            ..opts()
        },
    )
    .unwrap_err();
    assert!(
        e.detail.contains("no service \"db\"") && e.detail.contains("api, worker"),
        "{e}"
    );
}

#[test]
fn shell_forms_and_list_forms() {
    let s = one(
        "services:\n  s:\n    image: r/s:1.0.0\n    command: sensor --name 'box one'\n    environment:\n      - A=1\n      - B=x=y\n    healthcheck:\n      test: wget -q -O /dev/null http://127.0.0.1:8080/healthz || exit 1\n",
    );
    assert_eq!(
        s.container.cmd,
        Some(vec!["sensor".into(), "--name".into(), "box one".into()])
    );
    assert_eq!(s.container.env["B"], "x=y");
    assert_eq!(
        s.health.check,
        Some(HealthCheck::Exec(vec![
            "/bin/sh".into(),
            "-c".into(),
            "wget -q -O /dev/null http://127.0.0.1:8080/healthz || exit 1".into()
        ]))
    );
    let s = one("services:\n  s:\n    image: r/s:1.0.0\n    healthcheck:\n      test: [\"CMD-SHELL\", \"true\"]\n");
    assert_eq!(
        s.health.check,
        Some(HealthCheck::Exec(vec![
            "/bin/sh".into(),
            "-c".into(),
            "true".into()
        ]))
    );
    let s = one("services:\n  s:\n    image: r/s:1.0.0\n    healthcheck:\n      interval: 5s\n");
    assert_eq!(
        s.health.check,
        Some(HealthCheck::Docker {}),
        "no test: the image's own"
    );
    let s =
        one("services:\n  s:\n    image: r/s:1.0.0\n    healthcheck:\n      test: [\"NONE\"]\n");
    assert_eq!(s.health.check, None);
    let s = one("services:\n  s:\n    image: r/s:1.0.0\n    healthcheck:\n      disable: true\n      test: [\"CMD\", \"x\"]\n");
    assert_eq!(s.health, HealthSpec::default());
    let s = one("services:\n  s:\n    image: r/s:v3.1.4\n    network_mode: host\n    devices: [\"/dev/i2c-1:/dev/i2c-1\"]\n    privileged: true\n    mem_limit: 1g\n    platform: linux/arm64\n");
    assert_eq!(s.version.to_string(), "3.1.4");
    assert_eq!(s.container.network_mode.as_deref(), Some("host"));
    assert_eq!(s.container.devices, vec!["/dev/i2c-1".to_string()]);
    assert!(s.container.privileged);
    assert_eq!(s.container.memory_mb, Some(1024));
    assert_eq!(s.platforms, Some(vec!["linux/arm64".to_string()]));
}

/// Each key Ferry cannot honour: refused, with the key's path and line and why.
#[test]
fn keys_ferry_cannot_honour_are_refused_with_their_line() {
    let cases: &[(&str, usize, &str, &str)] = &[
        // Docker's "getting started" shape: a build context and a dependency.
        ("services:\n  web:\n    build: .\n    ports:\n      - \"8000:5000\"\n", 3, "services.web.build", "build and push"),
        ("services:\n  web:\n    image: r/w:1.0.0\n    depends_on:\n      - redis\n", 4, "services.web.depends_on", "start order"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    container_name: w1\n", 4, "services.w.container_name", "names"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    volumes:\n      - data:/data\n", 5, "services.w.volumes[0]", "named volumes"),
        ("services:\n  w:\n    image: r/w:1.0.0\nvolumes:\n  data: {}\n", 4, "volumes", "named volumes"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    volumes:\n      - ./data:/data\n", 5, "services.w.volumes[0]", "relative"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    volumes:\n      - /srv/data:/data\n", 5, "services.w.volumes[0]", "/var/lib/ferry-apps"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    ports:\n      - \"8080\"\n", 5, "services.w.ports[0]", "no host port"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    ports:\n      - \"8000-8010:8000-8010\"\n", 5, "services.w.ports[0]", "ranges"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    environment:\n      TOKEN:\n", 5, "services.w.environment", "shell"),
        ("services:\n  w:\n    image: r/w:${TAG}\n", 3, "services.w.image", "interpolation"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    restart: on-failure\n", 4, "services.w.restart", "unless-stopped"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    network_mode: service:db\n", 4, "services.w.network_mode", "bridge, host, none"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    env_file: .env\n", 4, "services.w.env_file", "environment"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    healthcheck:\n      test: [\"CMD\", \"x\"]\n      start_interval: 1s\n", 6, "services.w.healthcheck.start_interval", "cannot honour"),
        ("services:\n  w:\n    image: r/w:latest\n", 3, "services.w.image", "--version"),
        ("services:\n  w:\n    image: r/w\n", 3, "services.w.image", "tag or a digest"),
        ("services:\n  w:\n    ports: []\n", 2, "services.w", "no image"),
        ("services:\n  Web_App:\n    image: r/w:1.0.0\n", 2, "services.Web_App", "app's name"),
        ("networks:\n  front: {}\nservices:\n  w:\n    image: r/w:1.0.0\n", 1, "networks", "network_mode"),
        ("services:\n  w:\n    image: r/w:1.0.0\n    image: r/w:2.0.0\n", 4, "(file)", "twice"),
        ("services:\n  w:\n    image: [r/w:1.0.0\n", 4, "(file)", ""),
        ("", 1, "(file)", "empty"),
    ];
    for (text, line, path, why) in cases {
        let e = refused(text);
        assert_eq!((e.line, e.path.as_str()), (*line, *path), "{text}\n-> {e}");
        assert!(e.detail.contains(why), "{text}\n-> {e}");
    }
}

#[test]
fn extension_keys_are_ignored_and_merge_keys_yield_to_what_is_written() {
    let s = one(
        "x-base: &base\n  image: r/base:1.0.0\n  environment: {A: base}\nservices:\n  app:\n    <<: *base\n    x-note: anything\n    environment: {A: own}\n",
    );
    assert_eq!(s.image, "r/base:1.0.0");
    assert_eq!(s.container.env["A"], "own");
}
