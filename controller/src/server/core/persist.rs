//! The core's persistence: one transaction per round (lazy writes of device records, rollout
//! progress and report counters), retention, telemetry reads and the gauges of `/metrics`.

use super::*;

impl Core {
    // ---- persistence ------------------------------------------------------------------------

    /// Commit this round's changes in one transaction, then return the notices to publish.
    /// On a store error nothing is returned for publishing (the caller stops the server).
    /// Lazy changes (see `Dirty`) are included when [`LAZY_WRITE`] has passed.
    pub fn flush(&mut self) -> Result<Vec<Outgoing>, StoreError> {
        let due = self.last_lazy_write.elapsed() >= LAZY_WRITE;
        self.flush_with(due)
    }

    /// [`Core::flush`] including every lazy change: for a graceful stop, and tests.
    pub fn flush_all(&mut self) -> Result<Vec<Outgoing>, StoreError> {
        self.flush_with(true)
    }

    fn flush_with(&mut self, lazy_due: bool) -> Result<Vec<Outgoing>, StoreError> {
        let mut d = std::mem::take(&mut self.dirty);
        if lazy_due {
            d.rollouts.append(&mut d.lazy_rollouts);
            self.last_lazy_write = std::time::Instant::now();
        } else {
            // Not yet: keep them for a later round (those written now anyway drop out).
            self.dirty.lazy_rollouts = std::mem::take(&mut d.lazy_rollouts)
                .into_iter()
                .filter(|id| !d.rollouts.contains(id))
                .collect();
            self.dirty.devices = std::mem::take(&mut d.devices);
        }
        let changes = Changes {
            devices: d
                .devices
                .iter()
                .filter_map(|id| self.devices.get(id))
                .collect(),
            releases: d
                .releases
                .iter()
                .filter_map(|k| self.releases.get(k))
                .collect(),
            rollouts: d
                .rollouts
                .iter()
                .filter_map(|id| Some((self.rollouts.get(id)?, self.rollout_order[id])))
                .collect(),
            sequences: d
                .sequences
                .iter()
                .filter_map(|id| Some((id.as_str(), *self.sequences.get(id)?)))
                .collect(),
            desired: d
                .desired
                .iter()
                .filter_map(|id| Some((id.as_str(), self.desired.get(id)?)))
                .collect(),
            events: d.events,
            telemetry: d.telemetry,
            rollout_seq: d.rollout_seq.then_some(self.rollout_seq),
            keys: self
                .registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take_changes(lazy_due),
        };
        debug_assert!(
            changes.desired.iter().all(|(_, s)| !s.envelope.is_empty()),
            "a notice is written once, when signed, with its envelope"
        );
        let committed = self.store.commit(&changes);
        drop(changes);
        committed?;
        // Stored: the envelopes move from memory into the messages that publish them (a
        // re-publish reads them back, `pending_notices`). A device sent two notices in one
        // round gets the newer once: the older was never published and is superseded.
        let out = std::mem::take(&mut self.outbox)
            .into_iter()
            .filter_map(|q| match q {
                Queued::Ready(o) => Some(o),
                Queued::Notice { device, topic } => {
                    let s = self.desired.get_mut(&device)?;
                    (!s.envelope.is_empty()).then(|| Outgoing {
                        topic,
                        payload: std::mem::take(&mut s.envelope),
                    })
                }
            })
            .collect();
        for id in &d.desired {
            if let Some(s) = self.desired.get_mut(id) {
                s.envelope = String::new();
            }
        }
        Ok(out)
    }

    /// Retention: delete old events, fold old telemetry into hourly averages, drop the oldest.
    pub fn prune(&mut self, r: &crate::server::config::RetentionSection, now: DateTime<Utc>) {
        let before = now.timestamp() - r.events.as_secs() as i64;
        match self.store.prune_events(before, r.events_per_device) {
            Ok(0) => {}
            Ok(n) => debug!(deleted = n, "old events pruned"),
            Err(e) => warn!(error = %e, "cannot prune events"),
        }
        let ms = |d: Duration| now.timestamp_millis() - d.as_millis() as i64;
        match self.store.downsample(ms(r.telemetry_raw), ms(r.telemetry)) {
            Ok((0, 0)) => {}
            Ok((folded, dropped)) => {
                info!(folded, dropped, "telemetry downsampled to hourly averages")
            }
            Err(e) => warn!(error = %e, "cannot downsample telemetry"),
        }
    }

    /// A device's telemetry since `since`, per metric.
    pub fn telemetry(
        &self,
        device: &str,
        since: Duration,
        metric: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<crate::api::TelemetrySeries, ApiError> {
        if !self.devices.contains_key(device) {
            return Err(ApiError::not_found(format!("no device {device:?}")));
        }
        let since_ms = now.timestamp_millis() - since.as_millis().min(i64::MAX as u128) as i64;
        let series = self
            .store
            .telemetry(device, since_ms, metric)
            .map_err(|e| ApiError {
                status: 500,
                message: e.to_string(),
            })?;
        Ok(crate::api::TelemetrySeries {
            device: device.to_string(),
            since_ms,
            series,
        })
    }

    /// Recompute the gauges (when `/metrics` is read, not on every round).
    pub fn update_gauges(&self) {
        let mut g = self.metrics.gauges.lock().expect("metrics lock");
        g.clear();
        for d in self.devices.values() {
            *g.entry(format!("ferry_devices{{health=\"{}\"}}", d.health()))
                .or_default() += 1;
            *g.entry(format!("ferry_devices_online{{online=\"{}\"}}", d.online))
                .or_default() += 1;
        }
        {
            let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
            g.insert(
                "ferry_device_keys{status=\"approved\"}".into(),
                reg.approved_count() as u64,
            );
            g.insert(
                "ferry_device_keys{status=\"pending\"}".into(),
                reg.pending_count() as u64,
            );
        }
        for r in self.rollouts.values() {
            *g.entry(format!(
                "ferry_rollouts{{state=\"{}\"}}",
                r.machine.state().name()
            ))
            .or_default() += 1;
            if !r.machine.is_terminal() {
                let s = r.machine.summary();
                for (state, n) in [
                    ("pending", s.pending),
                    ("notified", s.notified),
                    ("soaking", s.soaking),
                    ("succeeded", s.succeeded),
                    ("failed", s.failed),
                ] {
                    g.insert(
                        format!(
                            "ferry_rollout_devices{{rollout=\"{}\",state=\"{state}\"}}",
                            r.id
                        ),
                        n as u64,
                    );
                }
            }
        }
        g.insert("ferry_releases".into(), self.releases.len() as u64);
    }
}
