//! Settings: environment variables a release lets the controller set per site or per device
//! (an APN, a calibration offset, a server URL) without a new release.
//!
//! The release (signed offline) declares each settable key with a type and, optionally, a
//! default (`container.settings`); the controller-signed notice carries values
//! (`settings`: app → key → value). A device accepts a notice only if every value is for a
//! declared key and parses as its type, and every key without a default has a value; the
//! values then become the container's environment beside `container.env`. A value changed is
//! a changed workload, so it rolls out like a version (waves, health gate, rollback).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::release::Release;

/// At most this many settings per release, and this long a value.
pub const MAX_SETTINGS: usize = 64;
pub const MAX_VALUE_BYTES: usize = 4096;
const MAX_KEY_BYTES: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettingType {
    String,
    /// A signed 64-bit integer, in decimal.
    Integer,
    /// A finite decimal number (`-1.5`, `3e2`).
    Number,
    /// `true` or `false`.
    Boolean,
}

impl SettingType {
    pub fn name(self) -> &'static str {
        match self {
            SettingType::String => "string",
            SettingType::Integer => "integer",
            SettingType::Number => "number",
            SettingType::Boolean => "boolean",
        }
    }
}

/// One settable key, as the release declares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingDecl {
    #[serde(rename = "type")]
    pub kind: SettingType,
    /// The value when the notice gives none; without it, every notice must give one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// For people (the console, `ferryctl release show`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Is `key` a usable environment variable name (`[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes)?
pub fn check_key(key: &str) -> Result<(), String> {
    let mut chars = key.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok
        || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        || key.len() > MAX_KEY_BYTES
    {
        return Err(format!(
            "{key:?} is not an environment variable name (letters, digits and _, not starting with a digit, at most {MAX_KEY_BYTES} bytes)"
        ));
    }
    Ok(())
}

/// Does `value` fit `decl`?
pub fn check_value(decl: &SettingDecl, value: &str) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "{} bytes, over the {MAX_VALUE_BYTES}-byte limit",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    let ok = match decl.kind {
        SettingType::String => true,
        SettingType::Integer => value.parse::<i64>().is_ok(),
        SettingType::Number => value.parse::<f64>().is_ok_and(f64::is_finite),
        SettingType::Boolean => matches!(value, "true" | "false"),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{value:?} is not a {}", decl.kind.name()))
    }
}

/// What is wrong with a notice's settings for one app.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("setting {key}: release {app} {version} does not declare it settable")]
    Undeclared {
        app: String,
        version: String,
        key: String,
    },
    #[error("setting {key}: {detail}")]
    BadValue { key: String, detail: String },
    #[error("setting {key}: release {app} {version} gives it no default and the notice no value")]
    Missing {
        app: String,
        version: String,
        key: String,
    },
}

/// The values a container gets: the notice's `values`, each checked against `release`'s
/// declaration, and the declared defaults for the rest.
pub fn resolve(
    release: &Release,
    values: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, SettingsError> {
    resolve_declared(
        &release.app,
        &release.version.to_string(),
        &release.container.settings,
        values,
    )
}

/// [`resolve`] against declarations held apart from their release (the controller's
/// catalogue), named `app` `version` in errors.
pub fn resolve_declared(
    app: &str,
    version: &str,
    decls: &BTreeMap<String, SettingDecl>,
    values: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, SettingsError> {
    for key in values.keys() {
        if !decls.contains_key(key) {
            return Err(SettingsError::Undeclared {
                app: app.to_string(),
                version: version.to_string(),
                key: key.clone(),
            });
        }
    }
    let mut out = BTreeMap::new();
    for (key, decl) in decls {
        let value = match (values.get(key), &decl.default) {
            (Some(v), _) => v.clone(),
            (None, Some(d)) => d.clone(),
            (None, None) => {
                return Err(SettingsError::Missing {
                    app: app.to_string(),
                    version: version.to_string(),
                    key: key.clone(),
                })
            }
        };
        check_value(decl, &value).map_err(|detail| SettingsError::BadValue {
            key: key.clone(),
            detail,
        })?;
        out.insert(key.clone(), value);
    }
    Ok(out)
}

/// `release` as it runs with `values`: the resolved settings join `container.env`.
pub fn apply(
    release: &mut Release,
    values: &BTreeMap<String, String>,
) -> Result<(), SettingsError> {
    let resolved = resolve(release, values)?;
    release.container.env.extend(resolved);
    Ok(())
}

/// The declarations' own checks, for [`Release::validate`]: key names, the limit, defaults
/// that fit their type, no key also fixed in `env`.
pub fn check_declarations(release: &Release) -> Result<(), (String, String)> {
    let c = &release.container;
    if c.settings.len() > MAX_SETTINGS {
        return Err((
            "container.settings".into(),
            format!("{} settings, at most {MAX_SETTINGS}", c.settings.len()),
        ));
    }
    for (key, decl) in &c.settings {
        let field = format!("container.settings.{key}");
        check_key(key).map_err(|d| (field.clone(), d))?;
        if c.env.contains_key(key) {
            return Err((
                field,
                "also fixed in container.env: a key is either set by the release or settable"
                    .into(),
            ));
        }
        if let Some(d) = &decl.default {
            check_value(decl, d).map_err(|e| (format!("{field}.default"), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::ContainerSpec;

    fn decl(kind: SettingType, default: Option<&str>) -> SettingDecl {
        SettingDecl {
            kind,
            default: default.map(str::to_string),
            description: None,
        }
    }

    fn release(settings: &[(&str, SettingDecl)]) -> Release {
        Release {
            app: "sensor".into(),
            version: semver::Version::new(1, 0, 0),
            image: "127.0.0.1:5055/ferry/sensor".into(),
            platforms: [(
                "linux/arm64".to_string(),
                format!("sha256:{}", "a".repeat(64)),
            )]
            .into(),
            container: ContainerSpec {
                env: [("FIXED".to_string(), "1".to_string())].into(),
                settings: settings
                    .iter()
                    .map(|(k, d)| (k.to_string(), d.clone()))
                    .collect(),
                ..Default::default()
            },
            health: Default::default(),
            created_at: chrono::Utc::now(),
        }
    }

    fn vals(v: &[(&str, &str)]) -> BTreeMap<String, String> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn values_are_checked_against_their_type() {
        let cases = [
            (SettingType::String, "anything at all", true),
            (SettingType::Integer, "-42", true),
            (SettingType::Integer, "4.2", false),
            (SettingType::Integer, "99999999999999999999", false),
            (SettingType::Number, "-1.5", true),
            (SettingType::Number, "3e2", true),
            (SettingType::Number, "NaN", false),
            (SettingType::Number, "inf", false),
            (SettingType::Boolean, "true", true),
            (SettingType::Boolean, "yes", false),
        ];
        for (kind, value, ok) in cases {
            assert_eq!(
                check_value(&decl(kind, None), value).is_ok(),
                ok,
                "{kind:?} {value:?}"
            );
        }
        let long = "x".repeat(MAX_VALUE_BYTES + 1);
        assert!(check_value(&decl(SettingType::String, None), &long).is_err());
        assert!(check_value(&decl(SettingType::String, None), "a\0b").is_err());
    }

    #[test]
    fn a_notice_fills_the_declared_keys_and_defaults_fill_the_rest() {
        let r = release(&[
            ("APN", decl(SettingType::String, Some("internet"))),
            ("OFFSET", decl(SettingType::Number, None)),
        ]);
        let got = resolve(&r, &vals(&[("OFFSET", "-0.5")])).unwrap();
        assert_eq!(got, vals(&[("APN", "internet"), ("OFFSET", "-0.5")]));
        let mut applied = r.clone();
        apply(
            &mut applied,
            &vals(&[("OFFSET", "2"), ("APN", "m2m.north")]),
        )
        .unwrap();
        assert_eq!(
            applied.container.env,
            vals(&[("APN", "m2m.north"), ("FIXED", "1"), ("OFFSET", "2")])
        );
    }

    #[test]
    fn undeclared_mistyped_and_missing_values_are_refused() {
        let r = release(&[
            ("APN", decl(SettingType::String, Some("internet"))),
            ("OFFSET", decl(SettingType::Number, None)),
        ]);
        let e = resolve(&r, &vals(&[("OFFSET", "1"), ("FIXED", "2")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "setting FIXED: release sensor 1.0.0 does not declare it settable"
        );
        let e = resolve(&r, &vals(&[("OFFSET", "warm")])).unwrap_err();
        assert_eq!(e.to_string(), "setting OFFSET: \"warm\" is not a number");
        let e = resolve(&r, &vals(&[])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "setting OFFSET: release sensor 1.0.0 gives it no default and the notice no value"
        );
    }

    #[test]
    fn declarations_are_checked() {
        assert!(check_declarations(&release(&[("APN", decl(SettingType::String, None))])).is_ok());
        for (key, d, field) in [
            (
                "1APN",
                decl(SettingType::String, None),
                "container.settings.1APN",
            ),
            (
                "A-B",
                decl(SettingType::String, None),
                "container.settings.A-B",
            ),
            (
                "FIXED",
                decl(SettingType::String, None),
                "container.settings.FIXED",
            ),
            (
                "LEVEL",
                decl(SettingType::Integer, Some("high")),
                "container.settings.LEVEL.default",
            ),
        ] {
            let (f, detail) = check_declarations(&release(&[(key, d)])).unwrap_err();
            assert_eq!(f, field, "{detail}");
        }
        let many: Vec<(String, SettingDecl)> = (0..=MAX_SETTINGS)
            .map(|i| (format!("K{i}"), decl(SettingType::String, None)))
            .collect();
        let refs: Vec<(&str, SettingDecl)> =
            many.iter().map(|(k, d)| (k.as_str(), d.clone())).collect();
        assert!(check_declarations(&release(&refs)).is_err());
    }

    #[test]
    fn a_declaration_round_trips_and_is_strict() {
        let d: SettingDecl =
            serde_json::from_str(r#"{"type":"integer","default":"3","description":"retries"}"#)
                .unwrap();
        assert_eq!(d.kind, SettingType::Integer);
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"type":"integer","default":"3","description":"retries"}"#
        );
        assert!(serde_json::from_str::<SettingDecl>(r#"{"type":"int"}"#).is_err());
        assert!(serde_json::from_str::<SettingDecl>(r#"{"type":"string","min":1}"#).is_err());
    }
}
