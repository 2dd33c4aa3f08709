//! Unit tests of the link's pure parts (packet sizes, topic names, the inbound queue).

use super::*;

#[test]
fn packet_size_matches_rumqttc() {
    for (topic, len) in [
        ("t", 0usize),
        ("ferry/v1/devices/dev-001/state", 90),
        ("a/b", 130),
        ("x", 16_380),
        ("x", 16_400),
        ("ferry/v1/devices/dev-001/desired", 300 * 1024),
        ("y", 2_100_000),
    ] {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let mut p = Publish::new(topic, qos, vec![0u8; len]);
            p.pkid = u16::from(qos != QoS::AtMostOnce); // set by rumqttc before encoding
            assert_eq!(
                publish_packet_size(topic.len(), len, qos),
                p.size(),
                "{topic} {len} {qos:?}"
            );
        }
    }
}

#[test]
fn topic_names() {
    assert!(check_topic_name("ferry/v1/devices/d/state").is_ok());
    assert!(check_topic_name("").is_err());
    assert!(check_topic_name("a/+/b").is_err());
    assert!(check_topic_name("a/#").is_err());
    assert!(check_topic_name("a\0").is_err());
}

fn desired(n: u8) -> Inbound {
    Inbound::Desired {
        payload: vec![n],
        retained: false,
    }
}

#[tokio::test]
async fn inbound_keeps_the_newest_when_full() {
    let counters = Arc::new(Counters::default());
    let (tx, mut rx) = mpsc::channel(INBOUND_CAPACITY);
    let q = InboundQueue::new(tx, counters.clone());
    for n in 0..20u8 {
        q.deliver(desired(n));
    }
    let mut got = Vec::new();
    while got.len() < INBOUND_CAPACITY + 1 {
        let item = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        got.push(item);
    }
    let mut want: Vec<_> = (0..INBOUND_CAPACITY as u8).map(desired).collect();
    want.push(desired(19));
    assert_eq!(got, want);
    assert_eq!(
        counters.inbound_dropped.load(Ordering::Relaxed),
        20 - INBOUND_CAPACITY as u64 - 1
    );
    // Once drained, delivery is direct again and in order.
    q.deliver(desired(20));
    q.deliver(desired(21));
    assert_eq!(rx.recv().await.unwrap(), desired(20));
    assert_eq!(rx.recv().await.unwrap(), desired(21));
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn inbound_survives_a_dropped_receiver() {
    let (tx, rx) = mpsc::channel(1);
    let q = InboundQueue::new(tx, Arc::new(Counters::default()));
    drop(rx);
    q.deliver(desired(1));
    q.deliver(desired(2));
}
