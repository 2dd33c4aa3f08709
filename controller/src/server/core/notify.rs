//! The core's notices: the app set a device runs, a notice prepared (its sequence and its
//! settings), signed (in parallel for a wave) and queued for the round's commit; a rollout's
//! wave and a revert; and the re-publish of those a device has not acknowledged.

use super::*;

impl Core {
    /// Notices stored but not acknowledged by their device (its reported sequence is lower):
    /// published again at start-up, byte-identical.
    /// A notice signed this round is still in memory; the others are read from the store.
    pub fn pending_notices(&self) -> Result<Vec<Outgoing>, StoreError> {
        let unacked: Vec<(&String, &SentDesired)> = self
            .desired
            .iter()
            .filter(|(id, s)| {
                self.devices
                    .get(*id)
                    .is_none_or(|d| d.sequence < s.sequence)
            })
            .collect();
        let stored: Vec<String> = unacked
            .iter()
            .filter(|(_, s)| s.envelope.is_empty())
            .map(|(id, _)| (*id).clone())
            .collect();
        let mut stored = if stored.is_empty() {
            BTreeMap::new()
        } else {
            self.store.notices(&stored)?
        };
        Ok(unacked
            .into_iter()
            .filter_map(|(id, s)| {
                let payload = if s.envelope.is_empty() {
                    let Some(e) = stored.remove(id) else {
                        warn!(device = %id, sequence = s.sequence, "the notice to re-publish is not in the database");
                        return None;
                    };
                    e
                } else {
                    s.envelope.clone()
                };
                Some(Outgoing {
                    topic: self.topics(id)?.desired(),
                    payload,
                })
            })
            .collect())
    }

    /// The app set a device runs, as app → version.
    pub(super) fn running_set(&self, device: &str) -> Result<BTreeMap<String, String>, String> {
        let dev = self
            .devices
            .get(device)
            .ok_or_else(|| "unknown device".to_string())?;
        if dev.platform.is_none() {
            return Err("the device has not reported its state yet".into());
        }
        Ok(dev
            .apps
            .iter()
            .map(|(a, s)| (a.clone(), s.version.clone()))
            .collect())
    }

    /// Allocate the next sequence, sign and queue a notice for `device`.
    pub(super) fn send(
        &mut self,
        device: &str,
        apps: BTreeMap<String, String>,
        how: How,
        now: DateTime<Utc>,
    ) -> Result<u64, String> {
        let p = self.prepare(device, apps, how, None)?;
        let sent = self.sign(std::slice::from_ref(&p), now).remove(0)?;
        Ok(self.sent(p, sent))
    }

    /// Everything a notice needs but its signature; the sequence is taken only by [`Core::sent`].
    pub(super) fn prepare(
        &self,
        device: &str,
        apps: BTreeMap<String, String>,
        how: How,
        settings: Option<AppSettings<'_>>,
    ) -> Result<Prepared, String> {
        let settings = self.settings_for(device, &apps, settings);
        let dev = self.devices.get(device).ok_or("unknown device")?;
        let topic = self.topics(device).ok_or("bad device id")?.desired();
        let own = self.sequences.get(device).copied().unwrap_or(0);
        let sequence = next_sequence(own, dev.sequence).ok_or("sequence exhausted")?;
        Ok(Prepared {
            device: device.to_string(),
            topic,
            platform: dev.platform.clone(),
            sequence,
            apps,
            settings,
            how,
        })
    }

    /// The settings of a device's next notice: for each app whose release declares settable
    /// keys, the values the device was last sent that the release still declares, then
    /// `over` (the rollout's `--set`, or a revert's values). The notice check refuses what
    /// does not fit (a required key without a value, a mistyped value).
    pub(super) fn settings_for(
        &self,
        device: &str,
        apps: &BTreeMap<String, String>,
        over: Option<AppSettings<'_>>,
    ) -> BTreeMap<String, BTreeMap<String, String>> {
        let carried = self.desired.get(device).map(|s| &s.settings);
        let mut out = BTreeMap::new();
        for (app, version) in apps {
            let Some(entry) = self.releases.get(&(app.clone(), version.clone())) else {
                continue;
            };
            let mut values: BTreeMap<String, String> = match &over {
                Some(AppSettings::Exactly(a, v)) if a == app => v.clone(),
                _ => carried
                    .and_then(|c| c.get(app))
                    .map(|m| {
                        m.iter()
                            .filter(|(k, _)| entry.settings.contains_key(*k))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            if let Some(AppSettings::Carry(a, v)) = &over {
                if a == app {
                    values.extend(v.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
            if !values.is_empty() {
                out.insert(app.clone(), values);
            }
        }
        out
    }

    /// Sign prepared notices (in parallel when there are many), in order.
    pub(super) fn sign(
        &self,
        prepared: &[Prepared],
        now: DateTime<Utc>,
    ) -> Vec<Result<SentDesired, String>> {
        let specs: Vec<NoticeSpec<'_>> = prepared
            .iter()
            .map(|p| NoticeSpec {
                device: &p.device,
                platform: p.platform.as_deref(),
                sequence: p.sequence,
                apps: &p.apps,
                strategy: p.how.strategy,
                allow_downgrade: p.how.allow_downgrade,
                rollout: p.how.rollout.as_deref(),
                expiry: self.cfg.notice_expiry,
                force: p.how.force,
                settings: &p.settings,
            })
            .collect();
        notices::build_many(&specs, &self.releases, &self.key, now)
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect()
    }

    /// Take the notice's sequence and queue it (stored by this round's commit, published
    /// after it).
    pub(super) fn sent(&mut self, p: Prepared, sent: SentDesired) -> u64 {
        let Prepared {
            device,
            topic,
            sequence,
            apps,
            ..
        } = p;
        debug!(device, sequence, ?apps, "notice signed");
        self.sequences.insert(device.clone(), sequence);
        self.dirty.sequences.insert(device.clone());
        self.outbox.push(Queued::Notice {
            device: device.clone(),
            topic,
        });
        self.desired.insert(device.clone(), sent);
        self.dirty.desired.insert(device);
        sequence
    }

    /// Notify a batch of a rollout's devices (a wave's start: all signed at once, in
    /// parallel). Returns the devices that cannot be sent the release, with the reason.
    pub(super) fn notify_for_rollout(
        &mut self,
        id: &str,
        devices: Vec<String>,
        now: DateTime<Utc>,
    ) -> Vec<(String, String)> {
        let rec = &self.rollouts[id];
        let (app, version) = (rec.app.clone(), rec.version.clone());
        let set = rec.settings.clone();
        let how = How {
            strategy: rec.strategy,
            allow_downgrade: false,
            rollout: Some(id.to_string()),
            force: rec.force,
        };
        let mut failed = Vec::new();
        let mut prepared = Vec::with_capacity(devices.len());
        for device in devices {
            let p = self.running_set(&device).and_then(|mut apps| {
                let mut from = apps.insert(app.clone(), version.clone());
                if app == ferry_protocol::release::AGENT_APP {
                    // The agent is not among the apps a box reports: it runs the version its
                    // state names, and a revert goes back to that one.
                    from = self
                        .devices
                        .get(&device)
                        .and_then(|d| d.agent_version.clone());
                }
                // What the app's settings were, for a revert.
                let before = self
                    .desired
                    .get(&device)
                    .and_then(|s| s.settings.get(&app))
                    .cloned()
                    .unwrap_or_default();
                let over = Some(AppSettings::Carry(&app, &set));
                Ok((
                    self.prepare(&device, apps, how.clone(), over)?,
                    (from, before),
                ))
            });
            match p {
                Ok(p) => prepared.push(p),
                Err(reason) => failed.push((device, reason)),
            }
        }
        let (prepared, from): (Vec<Prepared>, Vec<Before>) = prepared.into_iter().unzip();
        let signed = self.sign(&prepared, now);
        for ((p, (from, before)), sent) in prepared.into_iter().zip(from).zip(signed) {
            let device = p.device.clone();
            match sent {
                Ok(sent) => {
                    let seq = self.sent(p, sent);
                    let rec = self.rollouts.get_mut(id).expect("rollout exists");
                    rec.machine.notified(&device, seq);
                    rec.from.insert(device.clone(), from);
                    if !before.is_empty() {
                        rec.from_settings.insert(device.clone(), before);
                    }
                    info!(rollout = id, device, sequence = seq, "device notified");
                }
                Err(reason) => failed.push((device, reason)),
            }
        }
        failed
    }

    pub(super) fn revert_device(
        &mut self,
        id: &str,
        device: &str,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let rec = &self.rollouts[id];
        let app = rec.app.clone();
        let how = How {
            strategy: rec.strategy,
            allow_downgrade: true,
            rollout: Some(id.to_string()),
            force: rec.force,
        };
        let from = rec
            .from
            .get(device)
            .cloned()
            .ok_or("the rollout never sent this device anything")?;
        let before = rec.from_settings.get(device).cloned().unwrap_or_default();
        let mut apps = self.running_set(device)?;
        match &from {
            Some(v) => apps.insert(app.clone(), v.clone()),
            None => apps.remove(&app),
        };
        let p = self.prepare(device, apps, how, Some(AppSettings::Exactly(&app, before)))?;
        let sent = self.sign(std::slice::from_ref(&p), now).remove(0)?;
        let seq = self.sent(p, sent);
        info!(rollout = id, device, sequence = seq, to = ?from, "device sent back");
        Ok(())
    }
}
