//! Telemetry ingested in order and queried.

use super::*;

fn sample(dev: &str, s: i64, temp: f64, humidity: Option<f64>) -> Telemetry {
    let mut sensors = BTreeMap::from([("temperature_c".to_string(), temp)]);
    if let Some(h) = humidity {
        sensors.insert("humidity_pct".into(), h);
    }
    Telemetry {
        device: dev.into(),
        ts: t(s),
        sensors,
        system: ferry_protocol::report::SystemMetrics {
            cpu_pct: 12.5,
            mem_used_bytes: 100,
            mem_total_bytes: 400,
            disk_free_bytes: 1000,
            uptime_s: 60,
            extra: BTreeMap::from([("load1".to_string(), serde_json::json!(0.25))]),
        },
        missing: BTreeMap::new(),
        dropped: None,
    }
}

#[test]
fn telemetry_is_ingested_in_order_and_queryable() {
    for mut x in T::each() {
        x.fleet(1, "beta");
        // a batch flushed after an outage, then a live sample; the batch again (lost PUBACK)
        let batch = vec![
            sample("dev-0", 10, 20.0, None),
            sample("dev-0", 20, 21.0, None),
        ];
        x.core.ingest(
            Inbound::Telemetry {
                device: "dev-0".into(),
                samples: batch.clone(),
            },
            t(30),
        );
        x.core.ingest(
            Inbound::Telemetry {
                device: "dev-0".into(),
                samples: vec![sample("dev-0", 30, 22.0, Some(41.5))],
            },
            t(30),
        );
        x.core.ingest(
            Inbound::Telemetry {
                device: "dev-0".into(),
                samples: batch,
            },
            t(31),
        );
        x.flush();
        let latest = x.core.devices(None).unwrap()[0].telemetry.clone().unwrap();
        assert_eq!(latest.ts, t(30));
        assert_eq!(latest.values["humidity_pct"], 41.5);
        assert_eq!(latest.values["load1"], 0.25);
        let now = t(40);
        let s = x
            .core
            .telemetry("dev-0", Duration::from_secs(3600), None, now)
            .unwrap();
        let temps: Vec<f64> = s.series["temperature_c"].iter().map(|p| p.value).collect();
        assert_eq!(temps, [20.0, 21.0, 22.0]);
        assert_eq!(s.series["humidity_pct"].len(), 1);
        let only = x
            .core
            .telemetry("dev-0", Duration::from_secs(25), Some("temperature_c"), now)
            .unwrap();
        assert_eq!(only.series.keys().collect::<Vec<_>>(), ["temperature_c"]);
        assert_eq!(only.series["temperature_c"].len(), 2);
        assert_eq!(
            x.core
                .telemetry("nope", Duration::from_secs(1), None, now)
                .unwrap_err()
                .status,
            404
        );
        // survives a (graceful) restart: the stop writes what was written lazily
        x.core.flush_all().unwrap();
        let x = x.reopen();
        assert_eq!(
            x.core.devices(None).unwrap()[0]
                .telemetry
                .as_ref()
                .unwrap()
                .ts,
            t(30)
        );
    }
}
