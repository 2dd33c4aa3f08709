//! The link's bookkeeping across a reconnect, without I/O: which confirmed publishes are waiting
//! for their barrier's UNSUBACK, and what a dead connection's leftovers become (see the notes on
//! rumqttc at the top of `link.rs`). The worker feeds it rumqttc's events and its `pending` list;
//! everything here is plain data, unit-tested below.

use std::collections::{HashMap, VecDeque};

use rumqttc::{Publish, Request};
use tokio::sync::oneshot;

/// A publish whose delivery a caller waits for, and its barrier.
pub(super) struct Confirm {
    pub topic: String,
    pub payload: Vec<u8>,
    pub done: oneshot::Sender<bool>,
}

/// Confirmed publishes in flight (see `LinkHandle::publish_confirmed`).
#[derive(Default)]
pub(super) struct Tracked {
    /// Queued (publish and barrier in the request queue), in queue order.
    pub queued: VecDeque<Confirm>,
    /// Barrier written, by its packet id; waiting for the UNSUBACK.
    pub sent: HashMap<u16, Confirm>,
}

impl Tracked {
    /// An UNSUBSCRIBE went out with packet id `pkid`. The barriers are the only UNSUBSCRIBEs
    /// before a shutdown's drain, and rumqttc writes requests in queue order, so it is the
    /// barrier of the oldest queued confirmation.
    pub fn barrier_written(&mut self, pkid: u16) {
        if let Some(c) = self.queued.pop_front() {
            self.sent.insert(pkid, c);
        }
    }

    /// The UNSUBACK for `pkid` arrived: its publish was accepted before it.
    pub fn barrier_acked(&mut self, pkid: u16) -> Option<Confirm> {
        self.sent.remove(&pkid)
    }
}

/// What a dead connection leaves behind.
pub(super) struct Leftovers {
    /// Confirmations that will never come: resolve them `false` (their callers own the publish).
    pub unconfirmed: Vec<Confirm>,
    /// Carried publishes dropped, oldest first, to stay within the cap.
    pub dropped: usize,
}

/// Sort rumqttc's `pending` requests after a connection error (its unacknowledged and
/// still-queued requests, which a clean session's next CONNACK would clear):
///
/// - ordinary publishes are appended to `carried` (packet id and dup flag reset), to be queued
///   again after the next CONNACK; `stale` topics (`online`, the enrolment) are dropped, since
///   every CONNACK announces them afresh;
/// - every barrier written on the dead connection, and each barrier rumqttc moved into
///   `pending` (the first ones of `queued`; later ones may still sit in the request queue and go
///   out after the reconnect), loses its confirmation; the matching publish is not carried;
/// - `carried` keeps at most `cap` publishes, the newest.
pub(super) fn carry_over(
    tracked: &mut Tracked,
    pending: Vec<Request>,
    carried: &mut Vec<Publish>,
    stale: [&str; 2],
    cap: usize,
) -> Leftovers {
    let lost_barriers = pending
        .iter()
        .filter(|r| matches!(r, Request::Unsubscribe(_)))
        .count();
    let mut unconfirmed: Vec<Confirm> = tracked.sent.drain().map(|(_, c)| c).collect();
    for _ in 0..lost_barriers {
        match tracked.queued.pop_front() {
            Some(c) => unconfirmed.push(c),
            None => break,
        }
    }
    let mut lost = Vec::new();
    for request in pending {
        if let Request::Publish(mut p) = request {
            if stale.contains(&p.topic.as_str()) {
                continue;
            }
            // A confirmed publish stays with its caller.
            let same = |c: &Confirm| c.topic == p.topic && c.payload[..] == p.payload[..];
            if let Some(i) = unconfirmed.iter().position(same) {
                lost.push(unconfirmed.swap_remove(i));
                continue;
            }
            p.pkid = 0;
            p.dup = false;
            carried.push(p);
        }
    }
    // The rest were acknowledged but not confirmed; the caller may send them again.
    lost.extend(unconfirmed);
    let dropped = carried.len().saturating_sub(cap);
    carried.drain(..dropped);
    Leftovers {
        unconfirmed: lost,
        dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{QoS, Unsubscribe};

    fn publish(topic: &str, payload: &str, pkid: u16) -> Publish {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
        p.pkid = pkid;
        p.dup = pkid > 0;
        p
    }

    fn confirm(topic: &str, payload: &str) -> (Confirm, oneshot::Receiver<bool>) {
        let (done, rx) = oneshot::channel();
        (
            Confirm {
                topic: topic.into(),
                payload: payload.as_bytes().to_vec(),
                done,
            },
            rx,
        )
    }

    fn barrier(topic: &str) -> Request {
        Request::Unsubscribe(Unsubscribe::new(topic))
    }

    const STALE: [&str; 2] = ["d/online", "d/enroll"];

    #[test]
    fn barriers_pair_with_confirmations_in_queue_order() {
        let mut t = Tracked::default();
        let (a, mut ra) = confirm("d/telemetry", "a");
        let (b, mut rb) = confirm("d/telemetry", "b");
        t.queued.extend([a, b]);
        t.barrier_written(7);
        t.barrier_written(9);
        assert!(t.queued.is_empty());
        assert!(
            t.barrier_acked(8).is_none(),
            "an unknown packet id confirms nothing"
        );
        let c = t.barrier_acked(9).expect("b's barrier");
        assert_eq!(c.payload, b"b");
        c.done.send(true).unwrap();
        assert_eq!(rb.try_recv(), Ok(true));
        assert!(ra.try_recv().is_err(), "a still waits");
        // A barrier written with nothing queued (the drain's own UNSUBSCRIBE) is ignored.
        t.barrier_written(11);
        assert_eq!(t.sent.len(), 1);
    }

    #[test]
    fn ordinary_publishes_are_carried_in_order_and_stale_announcements_dropped() {
        let mut t = Tracked::default();
        let mut carried = vec![publish("d/events", "older", 0)];
        let pending = vec![
            Request::Publish(publish("d/online", "stale", 3)),
            Request::Publish(publish("d/events", "e1", 4)),
            Request::Publish(publish("d/enroll", "stale", 5)),
            Request::Publish(publish("d/state", "s1", 0)),
        ];
        let out = carry_over(&mut t, pending, &mut carried, STALE, 64);
        assert!(out.unconfirmed.is_empty());
        assert_eq!(out.dropped, 0);
        let got: Vec<(&str, &[u8], u16, bool)> = carried
            .iter()
            .map(|p| (p.topic.as_str(), &p.payload[..], p.pkid, p.dup))
            .collect();
        assert_eq!(
            got,
            vec![
                ("d/events", &b"older"[..], 0, false),
                ("d/events", &b"e1"[..], 0, false),
                ("d/state", &b"s1"[..], 0, false),
            ]
        );
    }

    #[test]
    fn a_confirmed_publish_is_not_carried_and_its_caller_hears_false() {
        let mut t = Tracked::default();
        // `w` had its barrier written; `q1` had publish and barrier moved into pending; `q2`
        // is still in the request queue (its barrier not in pending): it keeps waiting.
        let (w, mut rw) = confirm("d/telemetry", "w");
        let (q1, mut rq1) = confirm("d/telemetry", "q1");
        let (q2, mut rq2) = confirm("d/telemetry", "q2");
        t.queued.push_back(w);
        t.barrier_written(1);
        t.queued.extend([q1, q2]);
        let pending = vec![
            Request::Publish(publish("d/telemetry", "w", 2)),
            Request::Publish(publish("d/events", "plain", 3)),
            Request::Publish(publish("d/telemetry", "q1", 0)),
            barrier("d/telemetry"),
        ];
        let mut carried = Vec::new();
        let out = carry_over(&mut t, pending, &mut carried, STALE, 64);
        assert_eq!(carried.len(), 1);
        assert_eq!(carried[0].payload, &b"plain"[..]);
        let mut lost: Vec<Vec<u8>> = out.unconfirmed.iter().map(|c| c.payload.clone()).collect();
        lost.sort();
        assert_eq!(lost, vec![b"q1".to_vec(), b"w".to_vec()]);
        for c in out.unconfirmed {
            c.done.send(false).unwrap();
        }
        assert_eq!(rw.try_recv(), Ok(false));
        assert_eq!(rq1.try_recv(), Ok(false));
        assert!(rq2.try_recv().is_err());
        assert_eq!(t.queued.len(), 1);
        assert!(t.sent.is_empty());
    }

    #[test]
    fn a_written_barrier_whose_publish_was_acknowledged_still_resolves_false() {
        // The PUBACK came, the UNSUBACK did not: the publish is not in pending, but the caller
        // cannot know it arrived, so it hears false and may send it again.
        let mut t = Tracked::default();
        let (c, mut rx) = confirm("d/telemetry", "x");
        t.queued.push_back(c);
        t.barrier_written(5);
        let out = carry_over(&mut t, vec![], &mut Vec::new(), STALE, 64);
        assert_eq!(out.unconfirmed.len(), 1);
        for c in out.unconfirmed {
            c.done.send(false).unwrap();
        }
        assert_eq!(rx.try_recv(), Ok(false));
    }

    #[test]
    fn the_carried_list_keeps_the_newest_within_the_cap() {
        let mut t = Tracked::default();
        let mut carried: Vec<Publish> = (0..3)
            .map(|i| publish("d/events", &format!("old{i}"), 0))
            .collect();
        let pending = (0..3)
            .map(|i| Request::Publish(publish("d/events", &format!("new{i}"), 9)))
            .collect();
        let out = carry_over(&mut t, pending, &mut carried, STALE, 4);
        assert_eq!(out.dropped, 2);
        let kept: Vec<&[u8]> = carried.iter().map(|p| &p.payload[..]).collect();
        assert_eq!(kept, vec![&b"old2"[..], b"new0", b"new1", b"new2"]);
    }
}
