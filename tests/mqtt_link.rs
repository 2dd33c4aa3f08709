//! `MqttLink` against a real mosquitto (see `common/broker.rs`).

mod common;

use std::time::Duration;

use common::broker::{free_port, Broker};
use ferry_agent::mqtt::{Inbound, LinkHandle, MqttConfig, MqttError, MqttLink, QoS};
use ferry_protocol::topics::DeviceTopics;
use tokio::sync::{mpsc, watch};

const WAIT: Duration = Duration::from_secs(10);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Fast backoff so that the tests run in seconds.
fn config(url: String) -> MqttConfig {
    MqttConfig {
        url,
        keepalive: Duration::from_secs(30),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(1),
        ..MqttConfig::default()
    }
}

struct Agent {
    handle: LinkHandle,
    inbound: mpsc::Receiver<Inbound>,
    topics: DeviceTopics,
    _shutdown: watch::Sender<bool>,
}

fn start(cfg: &MqttConfig, device: &str) -> Agent {
    init_tracing();
    let topics = DeviceTopics::new(&cfg.topic_prefix, device).unwrap();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (handle, inbound) = MqttLink::start(cfg, device, topics.clone(), shutdown_rx).unwrap();
    Agent {
        handle,
        inbound,
        topics,
        _shutdown: shutdown_tx,
    }
}

async fn wait_connected(handle: &LinkHandle, want: bool) {
    let mut rx = handle.connected();
    tokio::time::timeout(WAIT, rx.wait_for(|c| *c == want))
        .await
        .unwrap_or_else(|_| panic!("link did not become connected={want}"))
        .unwrap();
}

async fn next_inbound(rx: &mut mpsc::Receiver<Inbound>) -> Inbound {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no inbound message in time")
        .expect("inbound channel closed")
}

/// `connected` turns true at CONNACK; the SUBSCRIBE follows. Live (non-retained) notices
/// published before the broker registered it would be lost, as MQTT intends.
fn wait_subscribed(broker: &Broker, device: &str) {
    // `<client id> 1 <topic>`; the client id is `ferry-<device>-<random>`.
    let line = format!(" 1 ferry/v1/devices/{device}/desired");
    assert!(
        broker.wait_for_log(&line, WAIT),
        "no subscription in the broker log:\n{}",
        broker.log()
    );
}

/// Run blocking broker helpers (they spawn mosquitto_pub / mosquitto_sub) off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announces_online_and_delivers_desired() {
    let broker = std::sync::Arc::new(Broker::start());
    let topics = DeviceTopics::new("ferry", "dev-001").unwrap();

    // A notice retained before the agent ever connects.
    broker.publish(&topics.desired(), b"notice-1", true);

    let mut agent = start(&config(broker.url()), "dev-001");
    wait_connected(&agent.handle, true).await;
    assert_eq!(
        next_inbound(&mut agent.inbound).await,
        Inbound::Desired {
            payload: b"notice-1".to_vec(),
            retained: true
        }
    );
    let b = broker.clone();
    let online = topics.online();
    assert_eq!(
        blocking(move || b.wait_retained(&online, b"1", WAIT)).await,
        Some(b"1".to_vec()),
        "online must be 1, retained"
    );

    // A live notice.
    let b = broker.clone();
    let desired = topics.desired();
    blocking(move || b.publish(&desired, b"notice-2", false)).await;
    assert_eq!(
        next_inbound(&mut agent.inbound).await,
        Inbound::Desired {
            payload: b"notice-2".to_vec(),
            retained: false
        }
    );

    // Messages on other topics are not delivered.
    let b = broker.clone();
    let other = agent.topics.state();
    blocking(move || b.publish(&other, b"not for the engine", false)).await;

    // Publishing through the handle.
    agent
        .handle
        .publish(
            agent.topics.state(),
            b"{\"state\":1}".to_vec(),
            true,
            QoS::AtLeastOnce,
        )
        .unwrap();
    let b = broker.clone();
    let state = agent.topics.state();
    assert_eq!(
        blocking(move || b.wait_retained(&state, b"{\"state\":1}", WAIT)).await,
        Some(b"{\"state\":1}".to_vec())
    );
    assert!(
        agent.inbound.try_recv().is_err(),
        "nothing else was delivered"
    );

    // Refused up front: wildcard topic, oversized packet.
    assert!(matches!(
        agent
            .handle
            .publish("a/#".into(), vec![], false, QoS::AtMostOnce),
        Err(MqttError::InvalidTopic { .. })
    ));
    assert!(matches!(
        agent.handle.publish(
            agent.topics.events(),
            vec![0; 2 << 20],
            false,
            QoS::AtLeastOnce
        ),
        Err(MqttError::TooLarge { .. })
    ));
    assert!(
        *agent.handle.connected().borrow(),
        "refused publishes do not disturb the link"
    );

    // Graceful shutdown: online = 0, clean DISCONNECT (no will).
    agent.handle.shutdown().await;
    assert!(agent.handle.is_stopped());
    assert!(!*agent.handle.connected().borrow());
    let b = broker.clone();
    let online = topics.online();
    assert_eq!(
        blocking(move || b.wait_retained(&online, b"0", WAIT)).await,
        Some(b"0".to_vec())
    );
    assert!(
        broker.wait_for_log(
            &format!("Client {} disconnected.", agent.handle.client_id()),
            WAIT
        ),
        "expected a clean disconnect:\n{}",
        broker.log()
    );
    assert!(matches!(
        agent
            .handle
            .publish(agent.topics.state(), vec![], false, QoS::AtMostOnce),
        Err(MqttError::Closed { .. })
    ));
    assert_eq!(agent.handle.stats().errors, 0);
    assert_eq!(agent.handle.stats().connects, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_queued_publishes() {
    let broker = std::sync::Arc::new(Broker::start());
    let agent = start(&config(broker.url()), "dev-drain");
    wait_connected(&agent.handle, true).await;

    let b = broker.clone();
    let events = agent.topics.events();
    let sub = blocking(move || b.subscribe(&events, 40)).await;
    for i in 0..40 {
        agent
            .handle
            .publish(
                agent.topics.events(),
                format!("event-{i}").into_bytes(),
                false,
                QoS::AtLeastOnce,
            )
            .unwrap();
    }
    // Shut down right away: everything queued goes out before online = 0 and DISCONNECT.
    agent.handle.shutdown().await;
    let got = blocking(move || sub.wait(WAIT)).await;
    let want: Vec<String> = (0..40).map(|i| format!("event-{i}")).collect();
    assert_eq!(got, want);
    assert_eq!(broker.retained(&agent.topics.online()), Some(b"0".to_vec()));
    assert!(broker.log().contains(&format!(
        "Client {} disconnected.",
        agent.handle.client_id()
    )));
}

/// The process-wide stop signal does not cut a live connection (the engine still publishes its
/// final reports); `LinkHandle::shutdown` then stops the link gracefully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_signal_keeps_a_live_connection_until_shutdown() {
    let broker = Broker::start();
    init_tracing();
    let cfg = config(broker.url());
    let topics = DeviceTopics::new("ferry", "dev-sig").unwrap();
    let (tx, rx) = watch::channel(false);
    let (handle, mut inbound) = MqttLink::start(&cfg, "dev-sig", topics.clone(), rx).unwrap();
    wait_connected(&handle, true).await;
    tx.send_replace(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(*handle.connected().borrow());
    handle
        .publish(topics.state(), b"final".to_vec(), true, QoS::AtLeastOnce)
        .unwrap();
    handle.shutdown().await;
    // The inbound channel closes once the link task has ended.
    assert!(tokio::time::timeout(WAIT, inbound.recv())
        .await
        .unwrap()
        .is_none());
    assert_eq!(broker.retained(&topics.state()), Some(b"final".to_vec()));
    assert_eq!(broker.retained(&topics.online()), Some(b"0".to_vec()));
    assert!(broker
        .log()
        .contains(&format!("Client {} disconnected.", handle.client_id())));
}

/// While the broker is unreachable, the stop signal ends the link at once: no more reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_signal_ends_a_disconnected_link() {
    let mut broker = Broker::start();
    init_tracing();
    let cfg = config(broker.url());
    let topics = DeviceTopics::new("ferry", "dev-sig2").unwrap();
    let (tx, rx) = watch::channel(false);
    let (handle, mut inbound) = MqttLink::start(&cfg, "dev-sig2", topics, rx).unwrap();
    wait_connected(&handle, true).await;
    broker.kill();
    wait_connected(&handle, false).await;
    let t = std::time::Instant::now();
    tx.send_replace(true);
    assert!(tokio::time::timeout(Duration::from_secs(1), inbound.recv())
        .await
        .expect("link should stop promptly")
        .is_none());
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(handle.is_stopped());
    let errors = handle.stats().errors;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        handle.stats().errors,
        errors,
        "no reconnect attempts after the stop signal"
    );
}

/// The link dies without DISCONNECT (process killed, power cut): the broker publishes the will.
#[test]
fn will_marks_the_device_offline_when_the_link_dies() {
    let broker = Broker::start();
    let cfg = config(broker.url());
    let topics = DeviceTopics::new("ferry", "dev-will").unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (_tx, rx) = watch::channel(false);
    let handle = rt.block_on(async {
        init_tracing();
        let (handle, _inbound) = MqttLink::start(&cfg, "dev-will", topics.clone(), rx).unwrap();
        wait_connected(&handle, true).await;
        handle
    });
    assert_eq!(
        broker.wait_retained(&topics.online(), b"1", WAIT),
        Some(b"1".to_vec())
    );

    let client_id = handle.client_id().to_string();
    // Abort every task of the runtime: the socket is closed without a DISCONNECT.
    rt.shutdown_background();
    drop(handle);

    assert_eq!(
        broker.wait_retained(&topics.online(), b"0", WAIT),
        Some(b"0".to_vec()),
        "the broker should have published the last will:\n{}",
        broker.log()
    );
    assert!(broker
        .log()
        .contains(&format!("Client {client_id} closed its connection.")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_with_backoff_after_broker_restart() {
    let broker = std::sync::Arc::new(std::sync::Mutex::new(Broker::start()));
    let url = broker.lock().unwrap().url();
    let mut agent = start(&config(url), "dev-re");
    wait_connected(&agent.handle, true).await;
    assert_eq!(agent.handle.stats().connects, 1);

    // A publish queued while the broker is down goes out after the reconnect.
    let b = broker.clone();
    blocking(move || b.lock().unwrap().stop()).await;
    wait_connected(&agent.handle, false).await;
    agent
        .handle
        .publish(
            agent.topics.state(),
            b"queued-while-down".to_vec(),
            true,
            QoS::AtLeastOnce,
        )
        .unwrap();

    let down = Duration::from_secs(3);
    tokio::time::sleep(down).await;
    let errors_while_down = agent.handle.stats().errors;
    // Backoff 200 ms .. 1 s: at most ~15 attempts in 3 s. A tight loop would make thousands.
    assert!(
        (2..=20).contains(&errors_while_down),
        "{errors_while_down} connection errors in {down:?}: not backing off?"
    );

    let b = broker.clone();
    blocking(move || b.lock().unwrap().restart()).await;
    wait_connected(&agent.handle, true).await;
    let stats = agent.handle.stats();
    assert_eq!(stats.connects, 2);
    assert!(stats.errors <= errors_while_down + 2, "{stats:?}");

    // Persistence is off: whatever is retained now was published after the restart.
    let b = broker.clone();
    let (online, state, desired) = (
        agent.topics.online(),
        agent.topics.state(),
        agent.topics.desired(),
    );
    let (got_online, got_state) = blocking(move || {
        let b = b.lock().unwrap();
        let o = b.wait_retained(&online, b"1", WAIT);
        let s = b.wait_retained(&state, b"queued-while-down", WAIT);
        // Re-subscribed: a new notice reaches the engine.
        b.publish(&desired, b"after-restart", true);
        (o, s)
    })
    .await;
    assert_eq!(got_online, Some(b"1".to_vec()), "online re-announced");
    assert_eq!(got_state, Some(b"queued-while-down".to_vec()));
    assert_eq!(
        next_inbound(&mut agent.inbound).await,
        Inbound::Desired {
            payload: b"after-restart".to_vec(),
            retained: false
        }
    );
    let log = broker.lock().unwrap().log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("New client connected from") && l.contains(" as ferry-dev-re-"))
            .count(),
        2,
        "one connection per broker run:\n{log}"
    );
    agent.handle.shutdown().await;
}

/// A clean session makes rumqttc forget unacknowledged publishes on reconnect; the link carries
/// them over so that QoS 1 stays at-least-once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_publish_survives_a_reconnect() {
    let broker = std::sync::Arc::new(std::sync::Mutex::new(Broker::start()));
    let url = broker.lock().unwrap().url();
    let agent = start(&config(url), "dev-carry");
    wait_connected(&agent.handle, true).await;
    {
        let b = broker.lock().unwrap();
        assert_eq!(
            b.wait_retained(&agent.topics.online(), b"1", WAIT),
            Some(b"1".to_vec())
        );
        b.freeze();
    }
    agent
        .handle
        .publish(
            agent.topics.state(),
            b"sent-but-not-acked".to_vec(),
            true,
            QoS::AtLeastOnce,
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // written to the socket, no PUBACK
    let b = broker.clone();
    blocking(move || b.lock().unwrap().kill()).await;
    wait_connected(&agent.handle, false).await;
    let b = broker.clone();
    blocking(move || b.lock().unwrap().restart()).await;
    wait_connected(&agent.handle, true).await;

    let (b, state) = (broker.clone(), agent.topics.state());
    let got = blocking(move || {
        b.lock()
            .unwrap()
            .wait_retained(&state, b"sent-but-not-acked", WAIT)
    })
    .await;
    assert_eq!(got, Some(b"sent-but-not-acked".to_vec()));
    agent.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_notice_is_delivered_not_a_disconnect() {
    let broker = std::sync::Arc::new(Broker::start());
    let mut agent = start(&config(broker.url()), "dev-big");
    wait_connected(&agent.handle, true).await;
    wait_subscribed(&broker, "dev-big");

    let big = vec![b'x'; 300 * 1024];
    let (b, desired, payload) = (broker.clone(), agent.topics.desired(), big.clone());
    blocking(move || b.publish(&desired, &payload, false)).await;
    match next_inbound(&mut agent.inbound).await {
        Inbound::Desired { payload, retained } => {
            assert_eq!(payload.len(), 300 * 1024);
            assert_eq!(payload, big);
            assert!(!retained);
        }
        other => panic!("{other:?}"),
    }
    assert!(*agent.handle.connected().borrow());
    assert_eq!(agent.handle.stats().errors, 0);

    // Still connected and subscribed: the next notice arrives as well.
    let (b, desired) = (broker.clone(), agent.topics.desired());
    blocking(move || b.publish(&desired, b"small", false)).await;
    assert_eq!(
        next_inbound(&mut agent.inbound).await,
        Inbound::Desired {
            payload: b"small".to_vec(),
            retained: false
        }
    );
    agent.handle.shutdown().await;
}

/// Trust records (protocol §10) arrive from the fleet-wide and the device's own trust topic,
/// retained ones on subscribe; the desired topic keeps working beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_records_arrive_from_both_trust_topics() {
    let broker = std::sync::Arc::new(Broker::start());
    let topics = DeviceTopics::new("ferry", "dev-trust").unwrap();
    let (b, fleet) = (broker.clone(), topics.fleet_trust());
    blocking(move || b.publish(&fleet, b"fleet-record", true)).await;
    let mut agent = start(&config(broker.url()), "dev-trust");
    wait_connected(&agent.handle, true).await;
    assert_eq!(
        next_inbound(&mut agent.inbound).await,
        Inbound::Trust {
            payload: b"fleet-record".to_vec(),
            retained: true
        }
    );
    let (b, own) = (broker.clone(), topics.trust());
    blocking(move || b.publish(&own, b"own-record", false)).await;
    assert_eq!(
        next_inbound(&mut agent.inbound).await,
        Inbound::Trust {
            payload: b"own-record".to_vec(),
            retained: false
        }
    );
    let (b, desired) = (broker.clone(), topics.desired());
    blocking(move || b.publish(&desired, b"notice", false)).await;
    assert_eq!(
        next_inbound(&mut agent.inbound).await,
        Inbound::Desired {
            payload: b"notice".to_vec(),
            retained: false
        }
    );
    agent.handle.shutdown().await;
}

/// A retained fleet-wide trust message over the limit: a device cannot delete it (the ACL
/// lets it only read the topic), so the link leaves the trust topics out for a while after one
/// reconnect, and keeps the desired topic (and its retained notice) intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_retained_trust_message_costs_one_reconnect_and_no_notice() {
    let broker = std::sync::Arc::new(Broker::start());
    let topics = DeviceTopics::new("ferry", "dev-bigtrust").unwrap();
    let (b, fleet) = (broker.clone(), topics.fleet_trust());
    blocking(move || b.publish(&fleet, &vec![b'x'; 2 * 1024 * 1024], true)).await;
    let (b, desired) = (broker.clone(), topics.desired());
    blocking(move || b.publish(&desired, b"retained-notice", true)).await;
    let mut agent = start(&config(broker.url()), "dev-bigtrust");
    assert_eq!(
        next_inbound(&mut agent.inbound).await,
        Inbound::Desired {
            payload: b"retained-notice".to_vec(),
            retained: true
        }
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = agent.handle.stats();
    assert_eq!(stats.oversized_dropped, 1, "{stats:?}");
    assert_eq!(stats.connects, 2, "one reconnect, no loop: {stats:?}");
    assert!(*agent.handle.connected().borrow());
    // The notice was not deleted (it was not the oversized one).
    let (b, desired) = (broker.clone(), topics.desired());
    assert_eq!(
        blocking(move || b.retained(&desired)).await,
        Some(b"retained-notice".to_vec())
    );
    // The desired topic still delivers.
    let (b, desired) = (broker.clone(), topics.desired());
    blocking(move || b.publish(&desired, b"after", false)).await;
    loop {
        match next_inbound(&mut agent.inbound).await {
            // The second connection's retained copy first.
            Inbound::Desired { retained: true, .. } => continue,
            other => {
                assert_eq!(
                    other,
                    Inbound::Desired {
                        payload: b"after".to_vec(),
                        retained: false
                    }
                );
                break;
            }
        }
    }
    agent.handle.shutdown().await;
}

/// A retained desired message over `max_incoming_bytes` (on an open broker anyone may publish
/// one): rumqttc can only drop the connection, and the broker would send it again on every
/// subscription. The link drops it with one reconnect, deletes it, and keeps listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_over_the_limit_costs_one_reconnect_not_a_loop() {
    let broker = std::sync::Arc::new(Broker::start());
    let topics = DeviceTopics::new("ferry", "dev-huge").unwrap();
    let (b, desired) = (broker.clone(), topics.desired());
    blocking(move || b.publish(&desired, &vec![b'x'; 2 * 1024 * 1024], true)).await;
    let mut agent = start(&config(broker.url()), "dev-huge");
    wait_connected(&agent.handle, true).await;
    wait_subscribed(&broker, "dev-huge");
    // Several backoff periods (200 ms .. 1 s): a loop would have reconnected again by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = agent.handle.stats();
    assert_eq!(stats.oversized_dropped, 1, "{stats:?}");
    assert_eq!(stats.connects, 2, "one reconnect, no loop: {stats:?}");
    assert_eq!(stats.errors, 1, "{stats:?}");
    assert!(*agent.handle.connected().borrow());
    let (b, desired) = (broker.clone(), agent.topics.desired());
    assert_eq!(
        blocking(move || b.retained(&desired)).await,
        None,
        "deleted"
    );
    // Still subscribed: a notice arrives.
    let (b, desired) = (broker.clone(), agent.topics.desired());
    blocking(move || b.publish(&desired, b"after", false)).await;
    assert_eq!(
        next_inbound(&mut agent.inbound).await,
        Inbound::Desired {
            payload: b"after".to_vec(),
            retained: false
        }
    );
    // A live one over the limit (not the first after the subscription) costs one reconnect
    // and deletes nothing: the retained notice stays.
    let (b, desired) = (broker.clone(), agent.topics.desired());
    blocking(move || b.publish(&desired, b"kept", true)).await;
    assert_eq!(
        next_inbound(&mut agent.inbound).await,
        Inbound::Desired {
            payload: b"kept".to_vec(),
            retained: false
        }
    );
    let (b, desired) = (broker.clone(), agent.topics.desired());
    blocking(move || b.publish(&desired, &vec![b'y'; 2 * 1024 * 1024], false)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = agent.handle.stats();
    assert_eq!(
        (stats.oversized_dropped, stats.connects),
        (2, 3),
        "{stats:?}"
    );
    let (b, desired) = (broker.clone(), agent.topics.desired());
    assert_eq!(
        blocking(move || b.retained(&desired)).await,
        Some(b"kept".to_vec())
    );
    agent.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_engine_gets_the_newest_notice() {
    let broker = std::sync::Arc::new(Broker::start());
    let mut agent = start(&config(broker.url()), "dev-slow");
    wait_connected(&agent.handle, true).await;
    wait_subscribed(&broker, "dev-slow");

    // The engine reads nothing while 20 notices arrive.
    let b = broker.clone();
    let desired = agent.topics.desired();
    blocking(move || {
        for i in 0..20 {
            b.publish(&desired, format!("n{i}").as_bytes(), false);
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    while let Ok(Some(Inbound::Desired { payload, .. })) =
        tokio::time::timeout(Duration::from_millis(500), agent.inbound.recv()).await
    {
        got.push(String::from_utf8(payload).unwrap());
    }
    assert_eq!(got.last().map(String::as_str), Some("n19"), "{got:?}");
    assert!(
        got.len() <= ferry_agent::mqtt::INBOUND_CAPACITY + 1,
        "{got:?}"
    );
    assert_eq!(
        agent.handle.stats().inbound_dropped as usize,
        20 - got.len()
    );
    agent.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_broker_is_down_is_immediate() {
    let mut broker = Broker::start();
    let agent = start(&config(broker.url()), "dev-down");
    wait_connected(&agent.handle, true).await;
    broker.kill();
    wait_connected(&agent.handle, false).await;
    let t = std::time::Instant::now();
    agent.handle.shutdown().await;
    assert!(agent.handle.is_stopped());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

/// mqtts with the ring provider, a private CA and a client certificate (mutual TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_private_ca() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("skipping: openssl CLI not available to make test certificates");
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &[
                "req",
                "-x509",
                "-days",
                "2",
                "-subj",
                "/CN=ferry test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ][..],
            &ec,
        ]
        .concat(),
    );
    openssl(
        &[
            &[
                "req",
                "-subj",
                "/CN=localhost",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ][..],
            &ec,
        ]
        .concat(),
    );
    std::fs::write(d.join("server.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
    openssl(
        &[
            &[
                "req",
                "-subj",
                "/CN=dev-tls",
                "-keyout",
                "client.key",
                "-out",
                "client.csr",
            ][..],
            &ec,
        ]
        .concat(),
    );
    // An extension file makes these X.509 v3 certificates; webpki rejects v1.
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "client.ext",
        "-out",
        "client.pem",
    ]);

    let tls_port = free_port();
    let broker = std::sync::Arc::new(Broker::start_with(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\n",
        ca = d.join("ca.pem").display(),
        cert = d.join("server.pem").display(),
        key = d.join("server.key").display(),
    )));

    let cfg = MqttConfig {
        ca_file: Some(d.join("ca.pem")),
        cert_file: Some(d.join("client.pem")),
        key_file: Some(d.join("client.key")),
        ..config(format!("mqtts://localhost:{tls_port}"))
    };
    let mut agent = start(&cfg, "dev-tls");
    wait_connected(&agent.handle, true).await;
    let (b, online, desired) = (
        broker.clone(),
        agent.topics.online(),
        agent.topics.desired(),
    );
    let got = blocking(move || {
        let got = b.wait_retained(&online, b"1", WAIT);
        b.publish(&desired, b"over-tls", true);
        got
    })
    .await;
    assert_eq!(got, Some(b"1".to_vec()));
    // Already subscribed, so it arrives live (retained = false).
    assert_eq!(
        next_inbound(&mut agent.inbound).await,
        Inbound::Desired {
            payload: b"over-tls".to_vec(),
            retained: false
        }
    );
    agent.handle.shutdown().await;

    // Without the client certificate the broker refuses the handshake; the link keeps retrying.
    let cfg = MqttConfig {
        cert_file: None,
        key_file: None,
        ..cfg
    };
    let agent = start(&cfg, "dev-tls-nocert");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!*agent.handle.connected().borrow());
    assert!(agent.handle.stats().errors >= 1);
    assert_eq!(agent.handle.stats().connects, 0);
    agent.handle.shutdown().await;
}

#[tokio::test]
async fn start_rejects_bad_config() {
    let topics = DeviceTopics::new("ferry", "d").unwrap();
    let (_tx, rx) = watch::channel(false);
    let cfg = MqttConfig {
        url: "mqtts://broker".into(),
        ..MqttConfig::default()
    };
    let err = MqttLink::start(&cfg, "d", topics, rx).unwrap_err();
    assert!(err.to_string().contains("mqtts needs ca_file"), "{err}");
}

/// Signed (protocol v2): `online`, the enrolment request and the last will are signed by the
/// device key; after a reconnect the will is signed anew, so the will the broker publishes when
/// the second connection dies outranks that connection's announce (a controller drops a report
/// whose counter is not higher than the last one it applied on that stream).
#[test]
fn signed_online_and_a_will_signed_anew_for_every_connection() {
    use ferry_agent::identity::{DeviceIdentity, IdentityConfig, Seal};
    use ferry_protocol::device_report::{self, Stream};

    let mut broker = Broker::start();
    let cfg = config(broker.url());
    let topics = DeviceTopics::new("ferry", "dev-sealed").unwrap();
    let state = tempfile::tempdir().unwrap();
    let id = DeviceIdentity::open(&IdentityConfig::default(), state.path(), "dev-sealed").unwrap();
    let key = id.key().public().clone();
    let seal: std::sync::Arc<dyn Seal> = std::sync::Arc::new(id);
    let online = |b: &Broker, want: bool| -> u64 {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(raw) = b.retained(&topics.online()) {
                let p = device_report::open(&raw, "dev-sealed", Stream::Online)
                    .expect("a signed online report")
                    .verify(&key)
                    .expect("signed by the device key");
                if p.body["online"] == want {
                    return p.counter;
                }
            }
            assert!(std::time::Instant::now() < deadline, "no online={want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (_tx, rx) = watch::channel(false);
    let handle = rt.block_on(async {
        init_tracing();
        let (handle, _inbound) =
            MqttLink::start_sealed(&cfg, "dev-sealed", topics.clone(), rx, seal.clone()).unwrap();
        wait_connected(&handle, true).await;
        handle
    });
    let first = online(&broker, true);
    let enroll = broker
        .retained(&topics.enroll())
        .expect("a retained enrolment request");
    let (k, _, _) = device_report::open(&enroll, "dev-sealed", Stream::Enroll)
        .unwrap()
        .verify_enrolment()
        .unwrap();
    assert_eq!(k.id(), key.id());

    // The broker goes away and comes back (no persistence: nothing retained survives).
    broker.stop();
    rt.block_on(wait_connected(&handle, false));
    broker.restart();
    rt.block_on(wait_connected(&handle, true));
    let second = online(&broker, true);
    assert!(second > first, "{second} > {first}");

    // The second connection dies without DISCONNECT: the broker publishes its will.
    rt.shutdown_background();
    drop(handle);
    let will = online(&broker, false);
    assert!(
        will > second,
        "the will ({will}) must outrank the announce of its connection ({second})"
    );
}
