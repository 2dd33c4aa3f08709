//! **Which replica leads**: a lease in PostgreSQL (`ferry_leader`, one row: holder, its API
//! URL, a fencing token and an expiry on the database's clock). Several `ferryctl serve` on one
//! database: the leader drives rollouts, signs notices and ingests device messages; the others
//! serve the API by forwarding it to the leader (`forward.rs`) and wait to take over.
//!
//! - **Taking it**: a replica takes the lease when it is free, expired, or held under its own
//!   id (a restart of this replica); each take adds one to the token. A follower tries every
//!   [`LeaseClock::follower_every`] (at most half a second).
//! - **Keeping it**: the leader renews it every `ttl / 3`, only while the row still says its id
//!   and token.
//! - **Fencing**: every commit of the leader's store checks, inside its transaction, that the
//!   row still holds its id and token and has not expired (`store/postgres.rs`): a replica
//!   whose lease went to another writes nothing, whatever its own clock says.
//! - **Stepping down**: a leader that has not renewed by `ttl - ttl / 6` after its last
//!   successful renewal began (its own monotonic clock, which starts before the database's
//!   expiry was set) exits at once ([`LOST_LEASE_EXIT`]), before any other replica can take
//!   over; systemd starts it again, as a follower.
//!
//! [`LeaseClock`] is the timing decision without I/O, unit-tested; [`Lease`] is the SQL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::forward::Role;
use super::metrics::Metrics;
use super::store::{Fence, PgThread, StoreError};

/// The exit status of a leader that could not renew its lease in time (EX_TEMPFAIL: systemd's
/// `Restart=on-failure` starts it again, as a follower).
pub const LOST_LEASE_EXIT: i32 = 75;

/// What the lease row says, as seen by one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// This replica leads with this token.
    Leader { token: i64 },
    /// Another replica leads (its id and API URL), or nobody (`None`) yet.
    Follower { leader: Option<(String, String)> },
}

/// The longest a follower waits between two tries to take the lease.
pub const FOLLOWER_POLL: Duration = Duration::from_millis(500);

/// When to renew and when a leader must stop, from its own monotonic clock.
#[derive(Clone, Debug)]
pub struct LeaseClock {
    ttl: Duration,
    /// When the last successful renewal (or take) was sent.
    renewed: Option<Instant>,
}

impl LeaseClock {
    pub fn new(ttl: Duration) -> LeaseClock {
        LeaseClock { ttl, renewed: None }
    }

    /// How often a leader renews the lease.
    pub fn every(&self) -> Duration {
        self.ttl / 3
    }

    /// How often a follower tries to take it: at most every half second (one query on its
    /// own connection), so that a dead leader is replaced within the lease plus that, not plus
    /// a third of the lease.
    pub fn follower_every(&self) -> Duration {
        self.every().min(FOLLOWER_POLL)
    }

    /// A renewal sent at `sent` succeeded.
    pub fn renewed(&mut self, sent: Instant) {
        self.renewed = Some(sent);
    }

    pub fn lost(&mut self) {
        self.renewed = None;
    }

    /// The moment a leader must have stopped writing: a margin before the database's expiry,
    /// which was set at or after `renewed` (so it lies at least `ttl` after it).
    pub fn deadline(&self) -> Option<Instant> {
        self.renewed.map(|r| r + self.ttl - self.ttl / 6)
    }

    /// Whether a leader has run past its deadline at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

/// The lease, on a connection of its own (a long commit of the store does not delay a renewal).
pub struct Lease {
    conn: PgThread,
    me: String,
    url: String,
    ttl: Duration,
    token: Option<i64>,
}

impl Lease {
    /// `me`: this replica's id (unique in the fleet of replicas); `url`: where the others
    /// forward API calls to while it leads.
    pub fn open(
        db_url: &str,
        ca: Option<&std::path::Path>,
        me: &str,
        url: &str,
        ttl: Duration,
    ) -> Result<Lease, StoreError> {
        // A take-over never waits long behind a transaction of a replica that went away.
        let conn = PgThread::start(
            db_url,
            ca,
            "SET lock_timeout = '2s'; SET application_name = 'ferryctl-lease'",
        )?;
        Ok(Lease {
            conn,
            me: me.to_string(),
            url: url.to_string(),
            ttl,
            token: None,
        })
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// The fence for the store while this replica leads.
    pub fn fence(&self) -> Option<Fence> {
        self.token.map(|token| Fence {
            holder: self.me.clone(),
            token,
        })
    }

    /// One round: renew when leading, else take the lease if it is free, expired or this
    /// replica's own; else report who leads.
    pub fn round(&mut self) -> Result<Held, StoreError> {
        let (me, url) = (self.me.clone(), self.url.clone());
        let ttl = self.ttl.as_secs_f64();
        let held = self.token;
        let r = self.conn.call(move |tx| {
            let pg = |cause| StoreError::Postgres {
                db: String::new(),
                cause,
            };
            if let Some(token) = held {
                let renewed = tx
                    .query_opt(
                        "UPDATE ferry_leader SET expires_at = clock_timestamp() + \
                         make_interval(secs => $3), url = $4 WHERE id = 1 AND holder = $1 \
                         AND token = $2 AND expires_at > clock_timestamp() RETURNING token",
                        &[&me, &token, &ttl, &url],
                    )
                    .map_err(pg)?;
                if renewed.is_some() {
                    return Ok(Held::Leader { token });
                }
            }
            let taken = tx
                .query_opt(
                    "UPDATE ferry_leader SET holder = $1, url = $2, token = token + 1, \
                     expires_at = clock_timestamp() + make_interval(secs => $3) WHERE id = 1 \
                     AND (holder IS NULL OR holder = $1 OR expires_at <= clock_timestamp()) \
                     RETURNING token",
                    &[&me, &url, &ttl],
                )
                .map_err(pg)?;
            if let Some(row) = taken {
                return Ok(Held::Leader { token: row.get(0) });
            }
            let row = tx
                .query_one(
                    "SELECT holder, url, expires_at > clock_timestamp() FROM ferry_leader \
                     WHERE id = 1",
                    &[],
                )
                .map_err(pg)?;
            let holder: Option<String> = row.get(0);
            let url: Option<String> = row.get(1);
            let live: bool = row.get(2);
            Ok(Held::Follower {
                leader: holder.zip(url).filter(|_| live),
            })
        });
        match &r {
            Ok(Held::Leader { token }) => self.token = Some(*token),
            _ => self.token = None,
        }
        r
    }

    /// Give the lease up (a clean stop): another replica takes over at its next round.
    pub fn release(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        let me = self.me.clone();
        let _ = self.conn.call(move |tx| {
            tx.execute(
                "UPDATE ferry_leader SET expires_at = '-infinity' WHERE id = 1 AND holder = $1 \
                 AND token = $2",
                &[&me, &token],
            )
            .map_err(|cause| StoreError::Postgres {
                db: String::new(),
                cause,
            })
        });
    }
}

/// The lease driven for `ferryctl serve`: a thread that renews it every `ttl / 3` (or tries to
/// take it every half second) and keeps [`Role`] up to date, and a watchdog that ends the
/// process the moment a leader is past its deadline or learns that another replica took over
/// (it must not write one more byte; systemd starts it again as a follower).
pub struct Replica {
    pub role: Arc<Role>,
    me: String,
    token: watch::Receiver<Option<i64>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Replica {
    pub fn start(mut lease: Lease, metrics: Arc<Metrics>) -> Replica {
        let me = lease.me().to_string();
        let role = Role::follower(&me);
        let clock = Arc::new(Mutex::new(LeaseClock::new(lease.ttl)));
        let stop = Arc::new(AtomicBool::new(false));
        let (token_tx, token) = watch::channel(None);
        // The first round's answer before `start` returns: the role is known before the API
        // serves (a lone replica leads at once, no call answered 503).
        let (known_tx, known_rx) = std::sync::mpsc::channel::<()>();
        let mut threads = Vec::new();
        {
            let (role, clock, stop) = (role.clone(), clock.clone(), stop.clone());
            let (every, follower_every) = {
                let c = clock.lock().expect("not poisoned");
                (c.every(), c.follower_every())
            };
            threads.push(
                std::thread::Builder::new()
                    .name("ferry-lease".into())
                    .spawn(move || {
                        let mut leading = false;
                        let mut first = true;
                        while !stop.load(Ordering::SeqCst) {
                            let sent = Instant::now();
                            match lease.round() {
                                Ok(Held::Leader { token }) => {
                                    clock.lock().expect("not poisoned").renewed(sent);
                                    if !leading {
                                        leading = true;
                                        tracing::info!(replica = %lease.me(), token, "this replica leads");
                                        role.set_leader(true);
                                        metrics.leader.store(1, Ordering::SeqCst);
                                        let _ = token_tx.send(Some(token));
                                    }
                                }
                                Ok(Held::Follower { leader }) => {
                                    if leading {
                                        tracing::error!(replica = %lease.me(), ?leader, "another replica took the lease over: stopping at once");
                                        std::process::exit(LOST_LEASE_EXIT);
                                    }
                                    role.set_leader_url(leader);
                                }
                                Err(e) => {
                                    tracing::warn!(replica = %lease.me(), error = %e, "leader lease: cannot reach the database");
                                }
                            }
                            if first {
                                first = false;
                                let _ = known_tx.send(());
                            }
                            let next = sent + if leading { every } else { follower_every };
                            while !stop.load(Ordering::SeqCst) && Instant::now() < next {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                        lease.release();
                    })
                    .expect("a thread for the lease"),
            );
        }
        {
            let (role, stop) = (role.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("ferry-lease-watch".into())
                    .spawn(move || {
                        while !stop.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(100));
                            let c = clock.lock().expect("not poisoned").clone();
                            if role.is_leader() && c.expired(Instant::now()) {
                                tracing::error!(
                                    "the leader lease was not renewed in time (database unreachable?): \
                                     stopping at once, before another replica takes over"
                                );
                                std::process::exit(LOST_LEASE_EXIT);
                            }
                        }
                    })
                    .expect("a thread for the lease watchdog"),
            );
        }
        let _ = known_rx.recv_timeout(Duration::from_secs(10));
        Replica {
            role,
            me,
            token,
            stop,
            threads,
        }
    }

    /// Wait until this replica leads (its fence for the store), or `None` when stopped first.
    pub async fn wait_leading(&mut self, stop: &mut watch::Receiver<bool>) -> Option<Fence> {
        tracing::info!(replica = %self.me, "following: waiting for the leader lease");
        tokio::select! {
            t = self.token.wait_for(Option::is_some) => {
                let token = (*t.ok()?)?;
                Some(Fence { holder: self.me.clone(), token })
            }
            _ = stop.wait_for(|s| *s) => None,
        }
    }

    /// Stop renewing and give the lease up (after the last commit).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_renews_three_times_per_ttl_and_stops_a_leader_before_its_expiry() {
        let mut c = LeaseClock::new(Duration::from_secs(6));
        assert_eq!(c.every(), Duration::from_secs(2));
        assert_eq!(c.follower_every(), Duration::from_millis(500));
        assert_eq!(
            LeaseClock::new(Duration::from_millis(900)).follower_every(),
            Duration::from_millis(300)
        );
        let t0 = Instant::now();
        assert!(!c.expired(t0 + Duration::from_secs(100)), "not leading");
        c.renewed(t0);
        assert!(!c.expired(t0 + Duration::from_millis(4_999)));
        // 1/6 of the ttl before the database's expiry (which is at least t0 + 6 s).
        assert!(c.expired(t0 + Duration::from_secs(5)));
        c.renewed(t0 + Duration::from_secs(2));
        assert!(!c.expired(t0 + Duration::from_secs(5)));
        c.lost();
        assert_eq!(c.deadline(), None);
    }

    /// The SQL against a real PostgreSQL: one leader at a time, renewals keep it, a restart of
    /// the same replica takes it back at once with a new token, an expired lease goes to the
    /// other, and the store of a replica that lost it writes nothing (fencing).
    #[test]
    fn one_leader_at_a_time_with_fencing_on_a_real_postgres() {
        use crate::server::store::{testdb::TestDb, Changes, PgStore, Store};
        let db = TestDb::create();
        let mut store_a = PgStore::connect(&db.url, None).unwrap();
        let ttl = Duration::from_secs(2);
        let mut a = Lease::open(&db.url, None, "a", "http://a", ttl).unwrap();
        let mut b = Lease::open(&db.url, None, "b", "http://b", ttl).unwrap();
        let Held::Leader { token: t1 } = a.round().unwrap() else {
            panic!("a takes the free lease")
        };
        assert_eq!(
            b.round().unwrap(),
            Held::Follower {
                leader: Some(("a".into(), "http://a".into()))
            }
        );
        assert_eq!(a.round().unwrap(), Held::Leader { token: t1 }, "renewed");
        store_a.set_fence(a.fence());
        let d = crate::server::model::Device::new("dev-1");
        let one = |s: &mut PgStore| {
            s.commit(&Changes {
                devices: vec![&d],
                ..Default::default()
            })
        };
        one(&mut store_a).unwrap();
        // a restarts: same id, a new token; the old incarnation's store is fenced.
        let mut a2 = Lease::open(&db.url, None, "a", "http://a", ttl).unwrap();
        let Held::Leader { token: t2 } = a2.round().unwrap() else {
            panic!("a's restart takes its own lease back")
        };
        assert_eq!(t2, t1 + 1);
        let e = one(&mut store_a).unwrap_err();
        assert!(matches!(e, StoreError::Fenced { .. }), "{e}");
        // a2 stops renewing: after the ttl b takes over.
        std::thread::sleep(ttl + Duration::from_millis(200));
        let Held::Leader { token: t3 } = b.round().unwrap() else {
            panic!("b takes the expired lease")
        };
        assert_eq!(t3, t2 + 1);
        assert!(matches!(a2.round().unwrap(), Held::Follower { .. }));
        let mut store_b = PgStore::connect(&db.url, None).unwrap();
        store_b.set_fence(b.fence());
        one(&mut store_b).unwrap();
        // A clean stop gives it up at once.
        b.release();
        assert!(matches!(a2.round().unwrap(), Held::Leader { .. }));
    }
}
