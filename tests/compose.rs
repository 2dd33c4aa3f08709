//! Compose files signed into releases that update a real box: `ferryctl release sign --compose`
//! (the CLI, resolving digests from the registry), pushed to a real `ferryctl serve`, rolled out
//! to a real agent on dockerd (the ARM sample image under qemu). The compose `healthcheck` is the
//! health gate: one that passes commits, one that fails rolls the box back by itself.

mod common;

use std::process::Command;

use common::infra::{self, ARM64};
use common::{desired, docker, release, AgentBuilder, Broker, Observer, Phase};
use common::{TestController, TestKeys, SLOW};

fn compose(health: &str) -> String {
    format!(
        "# a compose file as its operator writes it\n\
         x-note: signed by tests/compose.rs\n\
         services:\n\
         \x20 sensor:\n\
         \x20   image: {image}:2.0.0\n\
         \x20   environment:\n\
         \x20     SITE_NAME: \"north yard\"\n\
         \x20     PRICE: \"$$5\"\n\
         \x20   healthcheck:\n\
         \x20     test: {health}\n\
         \x20     interval: 1s\n\
         \x20     timeout: 2s\n\
         \x20     retries: 2\n\
         \x20   restart: unless-stopped\n\
         \x20   mem_limit: 64m\n\
         \x20   pids_limit: 64\n",
        image = infra::sensor_image(),
    )
}

/// The environment the running container was created with.
fn container_env(name: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{json .Config.Env}}", name])
        .output()
        .expect("docker inspect");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[test]
fn a_compose_file_signs_into_releases_that_update_a_box_and_its_healthcheck_gates() {
    infra::require_infra();
    let _images = docker::exclusive_images();
    let broker = Broker::start();
    let keys = TestKeys::new();
    let id = infra::device_id("compose");
    docker::remove_device_containers(&id);
    let obs = Observer::start(&broker, &id);
    let agent = AgentBuilder::new(&id, &broker, &keys)
        .platform(Some(ARM64))
        .start();
    obs.watch_agent(agent.liveness());
    obs.publish_desired(
        &desired(&id, 1)
            .app("sensor", release("1.0.0").signed(&keys))
            .rollout(None)
            .signed(&keys),
    );
    assert_eq!(obs.wait_terminal(1, SLOW).phase, Phase::Committed);
    let ctl = TestController::start(&broker, &keys);
    let dir = tempfile::tempdir().unwrap();
    let key = keys.release.private_pem.display().to_string();
    let sign = |file: &str, extra: &[&str]| {
        let out = dir.path().join(format!("{file}.json"));
        let path = dir.path().join(file);
        let mut args = vec!["release", "sign", "--compose", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend(["--key", key.as_str(), "--out", out.to_str().unwrap()]);
        (ctl.ctl(&args), out)
    };

    // 1. A passing healthcheck: the box runs 2.0.0 with the file's settings.
    let good = r#"["CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1:8080/healthz || exit 1"]"#;
    std::fs::write(dir.path().join("good.yml"), compose(good)).unwrap();
    let (o, out) = sign("good.yml", &[]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let signed: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(signed["releases"][0]["app"], "sensor", "{signed}");
    assert_eq!(signed["releases"][0]["version"], "2.0.0", "{signed}");
    assert!(
        signed["releases"][0]["platforms"]["linux/arm64"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{signed}"
    );
    ctl.push_release(&std::fs::read_to_string(&out).unwrap());
    // The controller started after the box: a rollout selects it once its retained state and
    // online flag have reached the controller (started at once, it matched no device).
    ctl.wait_devices("the box online on sensor 1.0.0", SLOW, |ds| {
        ds.iter().any(|d| {
            d.id == id && d.online && d.apps.get("sensor").is_some_and(|a| a.version == "1.0.0")
        })
    });
    let args = |version: &'static str| {
        [
            "--app",
            "sensor",
            "--version",
            version,
            "--select",
            "all",
            "--waves",
            "100%",
            "--soak",
            "1s",
            "--max-failures",
            "0",
            "--device-timeout",
            "150s",
        ]
    };
    let r = ctl.start_rollout(&args("2.0.0"));
    let done = ctl.wait_rollout(&r.id, "completed", 2 * SLOW, |v| v.state != "running");
    assert_eq!(
        done.state,
        "completed",
        "{done:?}\n{}",
        obs.describe_events()
    );
    let running = docker::running(&id);
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].version(), Some("2.0.0"));
    let env = container_env(&running[0].name);
    assert!(
        env.contains(&"SITE_NAME=north yard".to_string()) && env.contains(&"PRICE=$5".to_string()),
        "{env:?}"
    );
    // The gate the agent ran is the file's healthcheck.
    let gate = agent
        .log()
        .lines()
        .find(|l| l.contains("health gate started") && l.contains("wget -q -O /dev/null"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no gate with the compose test:\n{}", agent.log()));
    assert!(
        gate.contains("max_failures=2") && gate.contains("interval_s=1"),
        "{gate}"
    );

    // 2. A failing healthcheck on the next version: the gate fails, the box goes back to 2.0.0.
    std::fs::write(dir.path().join("bad.yml"), compose(r#"["CMD", "false"]"#)).unwrap();
    let (o, out) = sign("bad.yml", &["--service", "sensor", "--version", "2.0.1"]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    ctl.push_release(&std::fs::read_to_string(&out).unwrap());
    let r = ctl.start_rollout(&args("2.0.1"));
    let ended = obs.wait_event_where("the failed gate's rollback", 2 * SLOW, |e| {
        e.rollout.as_deref() == Some(r.id.as_str()) && e.phase == Phase::RolledBack
    });
    assert!(ended.reason.is_some(), "{ended:?}");
    let running = docker::running(&id);
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(
        running[0].version(),
        Some("2.0.0"),
        "the last good set runs"
    );

    // 3. A key Ferry cannot honour: refused with its line, nothing written.
    std::fs::write(
        dir.path().join("build.yml"),
        "services:\n  sensor:\n    build: .\n",
    )
    .unwrap();
    let (o, out) = sign("build.yml", &[]);
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("build.yml:line 3: services.sensor.build"),
        "{}",
        o.stderr
    );
    assert!(!out.exists());
}
