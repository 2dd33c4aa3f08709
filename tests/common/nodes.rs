//! A small labelled fleet of real agents for the controller-driven tests: [`beta_fleet`]
//! starts two agents (`group=beta`, the sample app on arm64 under qemu), each watched by an
//! [`Observer`]; [`install_v1`] gives them sensor 1.0.0 as sequence 1, published by the test.

use super::infra::{self, ARM64};
use super::{desired, docker, release, AgentBuilder, Broker, Observer, Phase, TestAgent};
use super::{TestController, TestKeys, SLOW};

/// A device id, its agent and its observer.
pub type Node = (String, TestAgent, Observer);

/// Two agents labelled `group=beta`, ids `<tag>-a` and `<tag>-b` (made unique per run).
pub fn beta_fleet(broker: &Broker, keys: &TestKeys, tag: &str) -> Vec<Node> {
    let mut nodes = Vec::new();
    for s in ["a", "b"] {
        let id = infra::device_id(&format!("{tag}-{s}"));
        docker::remove_device_containers(&id);
        let observer = Observer::start(broker, &id);
        let agent = AgentBuilder::new(&id, broker, keys)
            .platform(Some(ARM64))
            .config(|t| {
                let mut labels = toml::Table::new();
                labels.insert("group".into(), "beta".into());
                t.insert("labels".into(), labels.into());
            })
            .start();
        observer.watch_agent(agent.liveness());
        nodes.push((id, agent, observer));
    }
    nodes
}

/// Sensor 1.0.0 on every node, as sequence 1 (published by the test, not by a controller).
pub fn install_v1(nodes: &[Node], keys: &TestKeys) {
    let v1 = release("1.0.0").signed(keys);
    for (id, _, obs) in nodes {
        obs.publish_desired(
            &desired(id, 1)
                .app("sensor", v1.clone())
                .rollout(None)
                .signed(keys),
        );
    }
    for (_, _, obs) in nodes {
        assert_eq!(obs.wait_terminal(1, SLOW).phase, Phase::Committed);
    }
}

/// Until `ctl` sees every node online on sensor 1.0.0. A controller started after the boxes
/// learns them from their retained messages: a rollout started before that selects none.
pub fn wait_known(ctl: &TestController, nodes: &[Node]) {
    ctl.wait_devices("every node online on sensor 1.0.0", SLOW, |ds| {
        nodes.iter().all(|(id, _, _)| {
            ds.iter().any(|d| {
                &d.id == id
                    && d.online
                    && d.apps.get("sensor").is_some_and(|a| a.version == "1.0.0")
            })
        })
    });
}
