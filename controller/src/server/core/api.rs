//! The core's API commands: the catalogue, the inventory's views, rollouts started, paused,
//! resumed, aborted and rolled back. Answered in the core loop; written by the next flush.

use super::*;

impl Core {
    // ---- API commands -----------------------------------------------------------------------

    pub fn push_release(
        &mut self,
        envelope: &[u8],
        now: DateTime<Utc>,
    ) -> Result<ReleaseView, ApiError> {
        let v = verify_release(envelope, &self.release_keys, self.release_threshold)
            .map_err(|e| ApiError::unprocessable(format!("the release does not verify: {e}")))?;
        let r = &v.release;
        let key = (r.app.clone(), r.version.to_string());
        let text = String::from_utf8(v.envelope.clone())
            .map_err(|_| ApiError::bad_request("the envelope is not UTF-8"))?;
        if let Some(old) = self.releases.get(&key) {
            if old.envelope == text {
                return Ok(view_release(old));
            }
            return Err(ApiError::conflict(format!(
                "release {} {} is already catalogued with different content; releases are immutable, bump the version",
                key.0, key.1
            )));
        }
        let entry = ReleaseEntry {
            app: key.0.clone(),
            version: key.1.clone(),
            images: r
                .platforms
                .keys()
                .filter_map(|p| Some((p.clone(), r.reference_for(p)?)))
                .collect(),
            signers: v.signers.clone(),
            pushed_at: now,
            envelope: text,
            settings: r.container.settings.clone(),
        };
        info!(app = %entry.app, version = %entry.version, platforms = entry.images.len(), "release catalogued");
        let view = view_release(&entry);
        self.releases.insert(key.clone(), entry);
        self.dirty.releases.insert(key);
        Ok(view)
    }

    pub fn releases(&self) -> Vec<ReleaseView> {
        self.releases.values().map(view_release).collect()
    }

    pub fn devices(&self, select: Option<&str>) -> Result<Vec<DeviceView>, ApiError> {
        let sel = match select {
            Some(s) => Some(Selector::parse(s).map_err(|e| ApiError::bad_request(e.to_string()))?),
            None => None,
        };
        Ok(self
            .devices
            .values()
            .filter(|d| sel.as_ref().is_none_or(|s| s.matches(&d.id, &d.labels)))
            .map(view_device)
            .collect())
    }

    /// Up to `limit` devices the selector matches whose id sorts after `after`, in id order,
    /// with the number matching in all.
    pub fn device_page(
        &self,
        select: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<crate::api::DevicePage, ApiError> {
        if limit == 0 || limit > crate::api::MAX_PAGE {
            return Err(ApiError::bad_request(format!(
                "limit: 1 to {}",
                crate::api::MAX_PAGE
            )));
        }
        let sel = match select {
            Some(s) => Some(Selector::parse(s).map_err(|e| ApiError::bad_request(e.to_string()))?),
            None => None,
        };
        let matches = |d: &&Device| sel.as_ref().is_none_or(|s| s.matches(&d.id, &d.labels));
        let total = self.devices.values().filter(matches).count();
        let from = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        let mut page: Vec<&Device> = self
            .devices
            .range((from, std::ops::Bound::Unbounded))
            .map(|(_, d)| d)
            .filter(matches)
            .take(limit + 1)
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        Ok(crate::api::DevicePage {
            next: more.then(|| page.last().map(|d| d.id.clone())).flatten(),
            devices: page.into_iter().map(view_device).collect(),
            total,
        })
    }

    pub fn device(&self, id: &str) -> Result<DeviceDetail, ApiError> {
        let d = self
            .devices
            .get(id)
            .ok_or_else(|| ApiError::not_found(format!("no device {id:?}")))?;
        let events = self.store.recent_events(id, 20).map_err(|e| ApiError {
            status: 500,
            message: e.to_string(),
        })?;
        let sent = self.desired.get(id);
        Ok(DeviceDetail {
            device: view_device(d),
            desired_sequence: sent.map(|s| s.sequence),
            desired_apps: sent.map(|s| s.apps.clone()),
            events,
        })
    }

    /// What `start_rollout` would do with `req`, without doing it: the same checks, and the
    /// devices each wave would get (the console's preview).
    pub fn preview_rollout(
        &self,
        req: &StartRollout,
        now: DateTime<Utc>,
    ) -> Result<RolloutPreview, ApiError> {
        let (machine, _) = self.plan_rollout(req, now)?;
        let targets = machine.targets().to_vec();
        let waves = targets
            .iter()
            .scan(0, |before, &t| {
                let new = t - *before;
                *before = t;
                Some(new)
            })
            .collect();
        Ok(RolloutPreview {
            devices: machine.devices().len(),
            online: machine.devices().values().filter(|d| d.online).count(),
            targets,
            waves,
        })
    }

    pub fn start_rollout(
        &mut self,
        req: &StartRollout,
        now: DateTime<Utc>,
    ) -> Result<RolloutView, ApiError> {
        let (machine, version) = self.plan_rollout(req, now)?;
        let settings = req.settings.clone();
        self.rollout_seq += 1;
        let id = format!("r-{}", self.rollout_seq);
        self.dirty.rollout_seq = true;
        info!(rollout = %id, app = %req.app, version = %version, select = %req.select,
              waves = %req.waves, devices = machine.devices().len(), "rollout created");
        let rec = RolloutRecord {
            id: id.clone(),
            app: req.app.clone(),
            version,
            strategy: req.strategy.unwrap_or_default(),
            created_at: now,
            updated_at: now,
            from: BTreeMap::new(),
            reverted: Vec::new(),
            revert_failed: BTreeMap::new(),
            force: req.force,
            settings,
            from_settings: BTreeMap::new(),
            machine,
        };
        self.rollout_order.insert(id.clone(), self.rollout_seq);
        self.rollouts.insert(id.clone(), rec);
        self.dirty.rollouts.insert(id.clone());
        // Wave 0 starts now.
        let actions = self
            .rollouts
            .get_mut(&id)
            .expect("just inserted")
            .machine
            .on_tick(now);
        self.carry_out(&id, actions, now);
        Ok(self.rollout_view(&id, false).expect("just inserted"))
    }

    /// Checks a rollout request against the catalogue and the fleet, and plans its waves.
    fn plan_rollout(
        &self,
        req: &StartRollout,
        now: DateTime<Utc>,
    ) -> Result<(Rollout, String), ApiError> {
        let bad = ApiError::bad_request;
        let selector = Selector::parse(&req.select).map_err(|e| bad(format!("select: {e}")))?;
        let spec = WaveSpec::parse(&req.waves).map_err(|e| bad(format!("waves: {e}")))?;
        let soak = humantime::parse_duration(&req.soak)
            .map_err(|e| bad(format!("soak {:?}: {e}", req.soak)))?;
        let max_failures: FailureThreshold = req
            .max_failures
            .parse()
            .map_err(|e| bad(format!("max_failures: {e}")))?;
        let device_timeout = match &req.device_timeout {
            Some(t) => humantime::parse_duration(t)
                .map_err(|e| bad(format!("device_timeout {t:?}: {e}")))?,
            None => self.cfg.device_timeout,
        };
        if device_timeout.is_zero() {
            return Err(bad("device_timeout must be positive".into()));
        }
        let version = semver::Version::parse(&req.version)
            .map_err(|e| bad(format!("version {:?}: {e}", req.version)))?
            .to_string();
        let Some(entry) = self.releases.get(&(req.app.clone(), version.clone())) else {
            return Err(ApiError::unprocessable(format!(
                "release {} {version} is not in the catalogue (push it with `ferryctl release push`)",
                req.app
            )));
        };
        // Each value for a key the release declares settable, of its type.
        for (key, value) in &req.settings {
            let decl = entry.settings.get(key).ok_or_else(|| {
                let declared: Vec<&str> = entry.settings.keys().map(String::as_str).collect();
                ApiError::unprocessable(format!(
                    "setting {key}: release {} {version} does not declare it settable (it declares {})",
                    req.app,
                    if declared.is_empty() { "none".to_string() } else { declared.join(", ") }
                ))
            })?;
            ferry_protocol::settings::check_value(decl, value)
                .map_err(|e| bad(format!("setting {key}: {e}")))?;
        }
        if let Some((id, r)) = self
            .rollouts
            .iter()
            .find(|(_, r)| r.app == req.app && !r.machine.is_terminal())
        {
            return Err(ApiError::conflict(format!(
                "rollout {id} of {} is {}; abort it before starting another for the same app",
                r.app,
                r.machine.state().name()
            )));
        }
        let on_failure = req.on_failure.unwrap_or_default();
        if on_failure == crate::rollout::waves::OnFailure::Revert {
            // Reverting sends each device the release it runs now: that must be catalogued.
            let mut missing: BTreeMap<String, Vec<&str>> = BTreeMap::new();
            for d in self.devices.values() {
                if d.platform.is_none() || !selector.matches(&d.id, &d.labels) {
                    continue;
                }
                for (app, s) in &d.apps {
                    if !self
                        .releases
                        .contains_key(&(app.clone(), s.version.clone()))
                    {
                        missing
                            .entry(format!("{app} {}", s.version))
                            .or_default()
                            .push(&d.id);
                    }
                }
            }
            if !missing.is_empty() {
                let list: Vec<String> = missing
                    .iter()
                    .map(|(r, ids)| {
                        let more = ids.len().saturating_sub(3);
                        let shown = ids[..ids.len().min(3)].join(", ");
                        if more > 0 {
                            format!("{r} (on {shown} and {more} more)")
                        } else {
                            format!("{r} (on {shown})")
                        }
                    })
                    .collect();
                return Err(ApiError::unprocessable(format!(
                    "on_failure revert needs the releases the devices run now in the catalogue, to send them back; not catalogued: {}; push them first",
                    list.join("; ")
                )));
            }
        }
        let cands: Vec<Candidate<'_>> = self
            .devices
            .values()
            .filter(|d| d.platform.is_some())
            .map(|d| Candidate {
                id: &d.id,
                labels: &d.labels,
                online: self.live(&d.id),
            })
            .collect();
        let config = RolloutConfig {
            soak,
            device_timeout,
            max_failures,
            on_failure,
        };
        let machine = Rollout::new(selector, spec, config, cands, now)
            .map_err(|e| ApiError::unprocessable(e.to_string()))?;
        Ok((machine, version))
    }

    pub fn rollouts(&self) -> Vec<RolloutView> {
        let mut ids: Vec<(&u64, &String)> =
            self.rollout_order.iter().map(|(id, n)| (n, id)).collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|(_, id)| self.rollout_view(id, false))
            .collect()
    }

    pub fn rollout(&self, id: &str, with_devices: bool) -> Result<RolloutView, ApiError> {
        self.rollout_view(id, with_devices)
            .ok_or_else(|| ApiError::not_found(format!("no rollout {id:?}")))
    }

    pub fn rollout_op(
        &mut self,
        id: &str,
        op: crate::api::RolloutOp,
        now: DateTime<Utc>,
    ) -> Result<RolloutView, ApiError> {
        use crate::api::RolloutOp;
        let rec = self
            .rollouts
            .get_mut(id)
            .ok_or_else(|| ApiError::not_found(format!("no rollout {id:?}")))?;
        let conflict = |e: crate::rollout::waves::RolloutError| ApiError::conflict(e.to_string());
        let actions = match op {
            RolloutOp::Pause => {
                rec.machine
                    .pause("paused by the operator")
                    .map_err(conflict)?;
                Vec::new()
            }
            RolloutOp::Resume => rec.machine.resume(now).map_err(conflict)?,
            RolloutOp::Abort => {
                rec.machine
                    .abort("aborted by the operator")
                    .map_err(conflict)?;
                Vec::new()
            }
        };
        info!(
            rollout = id,
            op = op.as_str(),
            state = rec.machine.state().name(),
            "rollout changed by the operator"
        );
        self.dirty.rollouts.insert(id.to_string());
        rec.updated_at = now;
        self.carry_out(id, actions, now);
        Ok(self.rollout_view(id, false).expect("exists"))
    }

    pub fn rollback(
        &mut self,
        req: &RollbackRequest,
        now: DateTime<Utc>,
    ) -> Result<RollbackResult, ApiError> {
        let (app, force) = (req.app.as_str(), req.force);
        let sel = Selector::parse(&req.select).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let ids: Vec<String> = self
            .devices
            .values()
            .filter(|d| sel.matches(&d.id, &d.labels))
            .map(|d| d.id.clone())
            .collect();
        if ids.is_empty() {
            return Err(ApiError::unprocessable(format!(
                "the selector `{sel}` matches no device"
            )));
        }
        let mut out = Vec::new();
        for id in ids {
            let dev = &self.devices[&id];
            let from = dev.apps.get(app).map(|a| a.version.clone());
            let to = dev.previous.get(app).cloned();
            let mut item = RollbackItem {
                device: id.clone(),
                from: from.clone(),
                to: to.clone(),
                sequence: None,
                skipped: None,
            };
            match (&from, &to) {
                (_, None) => item.skipped = Some(format!("no previous release of {app} known")),
                (Some(f), Some(t)) if f == t => item.skipped = Some("already there".into()),
                (_, Some(t)) => {
                    let mut apps = match self.running_set(&id) {
                        Ok(a) => a,
                        Err(e) => {
                            item.skipped = Some(e);
                            out.push(item);
                            continue;
                        }
                    };
                    apps.insert(app.to_string(), t.clone());
                    let how = How {
                        strategy: Strategy::StopFirst,
                        allow_downgrade: true,
                        rollout: None,
                        force,
                    };
                    match self.send(&id, apps, how, now) {
                        Ok(seq) => {
                            info!(device = %id, app, to = %t, sequence = seq, "rollback sent");
                            item.sequence = Some(seq)
                        }
                        Err(e) => item.skipped = Some(e),
                    }
                }
            }
            out.push(item);
        }
        Ok(RollbackResult {
            app: app.to_string(),
            devices: out,
        })
    }

    fn rollout_view(&self, id: &str, with_devices: bool) -> Option<RolloutView> {
        let r = self.rollouts.get(id)?;
        let m = &r.machine;
        Some(RolloutView {
            id: r.id.clone(),
            app: r.app.clone(),
            version: r.version.clone(),
            strategy: r.strategy,
            select: m.selector().to_string(),
            waves: m.spec().to_string(),
            targets: m.targets().to_vec(),
            soak_s: m.config().soak.as_secs_f64(),
            device_timeout_s: m.config().device_timeout.as_secs_f64(),
            max_failures: m.config().max_failures.to_string(),
            on_failure: m.config().on_failure,
            force: r.force,
            settings: r.settings.clone(),
            state: m.state().name().to_string(),
            reason: m.state().reason().map(str::to_string),
            current_wave: m.current_wave(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            summary: m.summary(),
            reverted: r.reverted.clone(),
            revert_failed: r.revert_failed.clone(),
            devices: with_devices.then(|| m.devices().clone()),
        })
    }
}

fn view_release(r: &ReleaseEntry) -> ReleaseView {
    ReleaseView {
        app: r.app.clone(),
        version: r.version.clone(),
        images: r.images.clone(),
        signers: r.signers.clone(),
        pushed_at: r.pushed_at,
    }
}

fn view_device(d: &Device) -> DeviceView {
    DeviceView {
        id: d.id.clone(),
        platform: d.platform.clone(),
        agent_version: d.agent_version.clone(),
        labels: d.labels.to_btree(),
        apps: d.apps.to_btree(),
        health: d.health().to_string(),
        online: d.online,
        last_seen: d.last_seen,
        sequence: d.sequence,
        phase: d.phase.map(|p| p.as_str().to_string()),
        last_result: d.last_result.clone(),
        update: d.update.clone(),
        previous: d.previous.to_btree(),
        telemetry: d.telemetry.clone(),
        trust: d.trust.clone(),
    }
}
