//! `ferryctl release sign --compose`: a Compose file's services as Ferry release specs.
//!
//! Each service becomes one app (its name is the app's), with the image resolved to per-platform
//! digests and signed as any release. What Compose says and Ferry honours is translated; a key
//! Ferry cannot honour is an error naming the key and its line, never silently dropped (a
//! release that runs differently from the file it came from is worse than none):
//!
//! | Compose                         | Ferry release                                        |
//! |---------------------------------|------------------------------------------------------|
//! | `image`                         | `image` (a tag or a digest), `platform` → platforms   |
//! | `command` (string or list)      | `container.cmd`                                      |
//! | `environment` (map or list)     | `container.env`                                      |
//! | `ports` (short and long)        | `container.ports` (a fixed host port, any address)   |
//! | `volumes` (bind mounts)         | `container.binds`, under the allowed prefixes        |
//! | `healthcheck`                   | the health gate (`exec`; no test: the image's own)   |
//! | `restart` (always, unless-stopped) | what the agent does anyway                        |
//! | `network_mode`, `devices`, `privileged`, `mem_limit`, `pids_limit` | the same fields   |
//!
//! `x-*` extension keys are ignored, as Compose does; `version` and `name` are accepted and
//! mean nothing here. Variable interpolation (`${VAR}`) is refused: the signed release holds
//! the values, so the file must say them (`$$` is a literal `$`).

pub mod yaml;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;

use ferry_protocol::names::{check_app_name, check_platform};
use ferry_protocol::release::{BindSpec, ContainerSpec, HealthSpec, PortSpec, Proto};
use ferry_protocol::HealthCheck;
use ferry_registry::ImageReference;

use self::yaml::{Entry, Node};
use super::release::ReleaseSpec;

/// A compose file that cannot become a release: where, which key, why.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {path}: {detail}")]
pub struct ComposeError {
    pub line: usize,
    /// The key's path, e.g. `services.web.ports[1]`.
    pub path: String,
    pub detail: String,
}

/// What to take from the file.
#[derive(Clone, Debug, Default)]
pub struct ComposeOptions {
    /// Only this service (default: every service).
    pub service: Option<String>,
    /// The version of every app (default: each image's tag, when it is a semantic version).
    pub version: Option<semver::Version>,
    /// Bind mounts must be under one of these host directories (the boxes'
    /// `policy.allowed_bind_prefixes`).
    pub bind_prefixes: Vec<String>,
}

/// One service as a release spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ComposeApp {
    pub service: String,
    pub spec: ReleaseSpec,
}

fn err(line: usize, path: &str, detail: impl Into<String>) -> ComposeError {
    ComposeError {
        line,
        path: path.to_string(),
        detail: detail.into(),
    }
}

/// Why Ferry does not take a key Compose knows (the rest get a generic reason).
fn refusal(key: &str) -> &'static str {
    match key {
        "build" => "Ferry signs images from a registry: build and push the image, then name it in `image`",
        "container_name" | "hostname" => "Ferry names the app's containers itself (two run side by side during an update)",
        "depends_on" | "links" | "external_links" => "each app is updated on its own; apps must not rely on start order",
        "networks" => "use network_mode (bridge, host or none); user-defined networks are not created on the box",
        "env_file" => "the signed release must hold the values: write them under `environment`",
        "entrypoint" => "only the command can be set; put the program in `command` or in the image",
        "deploy" => "Swarm's deploy section has no meaning on a box; use mem_limit and pids_limit",
        "secrets" | "configs" => "not delivered to boxes; use a bind mount under the allowed prefixes",
        "labels" => "Ferry's own labels mark the containers it owns",
        _ => "Ferry cannot honour it",
    }
}

/// A string value: scalars only, no interpolation, `$$` unescaped.
fn text(node: &Node, path: &str) -> Result<String, ComposeError> {
    let Some(v) = node.as_str() else {
        return Err(err(
            node.line(),
            path,
            format!("expected a value, found {}", node.kind()),
        ));
    };
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' {
            if chars.peek() == Some(&'$') {
                chars.next();
                out.push('$');
                continue;
            }
            return Err(err(
                node.line(),
                path,
                format!(
                    "{v:?}: variable interpolation is not supported (the signed release holds the \
                     values; write them, or $$ for a literal $)"
                ),
            ));
        }
        out.push(c);
    }
    Ok(out)
}

fn entries<'a>(node: &'a Node, path: &str) -> Result<&'a [Entry], ComposeError> {
    match node {
        Node::Map { entries, .. } => Ok(entries),
        other => Err(err(
            other.line(),
            path,
            format!("expected a mapping, found {}", other.kind()),
        )),
    }
}

fn items<'a>(node: &'a Node, path: &str) -> Result<&'a [Node], ComposeError> {
    match node {
        Node::Seq { items, .. } => Ok(items),
        other => Err(err(
            other.line(),
            path,
            format!("expected a list, found {}", other.kind()),
        )),
    }
}

fn boolean(node: &Node, path: &str) -> Result<bool, ComposeError> {
    match text(node, path)?.as_str() {
        "true" | "True" | "TRUE" => Ok(true),
        "false" | "False" | "FALSE" => Ok(false),
        v => Err(err(
            node.line(),
            path,
            format!("{v:?}: expected true or false"),
        )),
    }
}

fn number(node: &Node, path: &str) -> Result<u64, ComposeError> {
    let v = text(node, path)?;
    v.parse()
        .map_err(|_| err(node.line(), path, format!("{v:?}: expected a whole number")))
}

/// Compose's duration (`1m30s`, `10s`, `500ms`) as whole seconds, rounded up, at least 1.
fn seconds(node: &Node, path: &str) -> Result<u32, ComposeError> {
    let v = text(node, path)?;
    let d = humantime::parse_duration(&v)
        .map_err(|e| err(node.line(), path, format!("{v:?}: not a duration ({e})")))?;
    if d.is_zero() {
        return Err(err(node.line(), path, "must be positive"));
    }
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    u32::try_from(s).map_err(|_| err(node.line(), path, "too long"))
}

/// `256m`, `1g`, `1024k`, `268435456` (bytes), as MiB rounded up.
fn mebibytes(node: &Node, path: &str) -> Result<u64, ComposeError> {
    let v = text(node, path)?.to_ascii_lowercase();
    let v = v.strip_suffix('b').filter(|s| !s.is_empty()).unwrap_or(&v);
    let (digits, unit) = match v.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => v.split_at(i),
        None => (v, ""),
    };
    let n: u64 = digits.parse().map_err(|_| {
        err(
            node.line(),
            path,
            format!("{v:?}: expected e.g. 256m or 1g"),
        )
    })?;
    let bytes = match unit {
        "" => Some(n),
        "k" => n.checked_mul(1 << 10),
        "m" => n.checked_mul(1 << 20),
        "g" => n.checked_mul(1 << 30),
        _ => None,
    }
    .ok_or_else(|| {
        err(
            node.line(),
            path,
            format!("{v:?}: expected e.g. 256m or 1g"),
        )
    })?;
    let mib = bytes.div_ceil(1 << 20);
    if mib == 0 {
        return Err(err(node.line(), path, "must be positive"));
    }
    Ok(mib)
}

/// Turn the compose file's text into one release spec per service taken.
pub fn parse(text_in: &str, opts: &ComposeOptions) -> Result<Vec<ComposeApp>, ComposeError> {
    let root = yaml::parse(text_in).map_err(|e| err(e.line, "(file)", e.detail))?;
    let mut services = None;
    for e in entries(&root, "(file)")? {
        match e.key.as_str() {
            "services" => services = Some(e),
            "version" | "name" => {}
            k if k.starts_with("x-") => {}
            "volumes" | "networks" | "secrets" | "configs" if e.value.is_null() => {}
            "volumes" => {
                return Err(err(
                    e.line,
                    &e.key,
                    "named volumes are not created on the box: bind a host directory under the \
                     allowed prefixes instead",
                ))
            }
            k => return Err(err(e.line, k, refusal(k))),
        }
    }
    let services = services.ok_or_else(|| err(root.line(), "services", "no services"))?;
    let list = entries(&services.value, "services")?;
    if list.is_empty() {
        return Err(err(services.line, "services", "no services"));
    }
    if let Some(want) = &opts.service {
        if !list.iter().any(|e| &e.key == want) {
            return Err(err(
                services.line,
                "services",
                format!(
                    "no service {want:?} (the file has: {})",
                    list.iter()
                        .map(|e| e.key.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    list.iter()
        .filter(|e| opts.service.as_ref().is_none_or(|w| *w == e.key))
        .filter(|e| !e.key.starts_with("x-"))
        .map(|e| service(e, opts))
        .collect()
}

/// Read and parse a compose file.
pub fn load(path: &Path, opts: &ComposeOptions) -> anyhow::Result<Vec<ComposeApp>> {
    let raw = crate::read_capped(path, 1024 * 1024)?;
    let text =
        String::from_utf8(raw).map_err(|_| anyhow::anyhow!("{} is not UTF-8", path.display()))?;
    parse(&text, opts).map_err(|e| anyhow::anyhow!("compose file {}:{e}", path.display()))
}

fn service(svc: &Entry, opts: &ComposeOptions) -> Result<ComposeApp, ComposeError> {
    let base = format!("services.{}", svc.key);
    check_app_name(&svc.key).map_err(|d| {
        err(
            svc.line,
            &base,
            format!("the service name is the app's name: {d}"),
        )
    })?;
    let mut image = None;
    let mut platforms = None;
    let mut c = ContainerSpec::default();
    let mut health = HealthSpec::default();
    for e in entries(&svc.value, &base)? {
        let path = format!("{base}.{}", e.key);
        let v = &e.value;
        match e.key.as_str() {
            k if k.starts_with("x-") => {}
            "image" => image = Some((text(v, &path)?, v.line())),
            "platform" => {
                let p = text(v, &path)?;
                check_platform(&p).map_err(|d| err(v.line(), &path, d))?;
                platforms = Some(vec![p]);
            }
            "command" => c.cmd = Some(command(v, &path)?),
            "environment" => c.env = environment(v, &path)?,
            "ports" => {
                for (i, p) in items(v, &path)?.iter().enumerate() {
                    c.ports.push(port(p, &format!("{path}[{i}]"))?);
                }
            }
            "volumes" => {
                for (i, b) in items(v, &path)?.iter().enumerate() {
                    c.binds
                        .push(volume(b, &format!("{path}[{i}]"), &opts.bind_prefixes)?);
                }
            }
            "devices" => {
                for (i, d) in items(v, &path)?.iter().enumerate() {
                    c.devices.push(device(d, &format!("{path}[{i}]"))?);
                }
            }
            "healthcheck" => health = healthcheck(v, &path)?,
            "restart" => match text(v, &path)?.as_str() {
                "always" | "unless-stopped" => {}
                r => {
                    return Err(err(
                        v.line(),
                        &path,
                        format!(
                            "{r:?}: Ferry keeps every app running (unless-stopped) and rolls back \
                             one that fails its health gate; write always or unless-stopped"
                        ),
                    ))
                }
            },
            "network_mode" => {
                let m = text(v, &path)?;
                if !matches!(m.as_str(), "bridge" | "host" | "none") {
                    return Err(err(
                        v.line(),
                        &path,
                        format!("{m:?}: one of bridge, host, none"),
                    ));
                }
                c.network_mode = Some(m);
            }
            "privileged" => c.privileged = boolean(v, &path)?,
            "mem_limit" => c.memory_mb = Some(mebibytes(v, &path)?),
            "pids_limit" => c.pids = Some(number(v, &path)?).filter(|n| *n > 0),
            k => return Err(err(e.line, &path, format!("{k}: {}", refusal(k)))),
        }
    }
    let Some((image, image_line)) = image else {
        return Err(err(
            svc.line,
            &base,
            "no image (Ferry signs images from a registry)",
        ));
    };
    let r = ImageReference::parse(&image)
        .map_err(|e| err(image_line, &format!("{base}.image"), e.to_string()))?;
    let Some(reference) = r.reference() else {
        return Err(err(
            image_line,
            &format!("{base}.image"),
            format!("{image:?} needs a tag or a digest"),
        ));
    };
    let version = match &opts.version {
        Some(v) => v.clone(),
        None => {
            let tag = reference.trim_start_matches('v');
            semver::Version::parse(tag).map_err(|_| {
                err(
                    image_line,
                    &format!("{base}.image"),
                    format!(
                        "the tag {reference:?} is not a semantic version: give the release's \
                         version with --version"
                    ),
                )
            })?
        }
    };
    let spec = ReleaseSpec {
        app: svc.key.clone(),
        version,
        image,
        platforms,
        container: c,
        health,
    };
    Ok(ComposeApp {
        service: svc.key.clone(),
        spec,
    })
}

fn command(v: &Node, path: &str) -> Result<Vec<String>, ComposeError> {
    let argv = match v {
        Node::Seq { items, .. } => items
            .iter()
            .map(|n| text(n, path))
            .collect::<Result<Vec<_>, _>>()?,
        _ => {
            let line = text(v, path)?;
            shlex::split(&line)
                .ok_or_else(|| err(v.line(), path, format!("{line:?}: unbalanced quotes")))?
        }
    };
    if argv.is_empty() {
        return Err(err(v.line(), path, "an empty command"));
    }
    Ok(argv)
}

fn environment(v: &Node, path: &str) -> Result<BTreeMap<String, String>, ComposeError> {
    let mut env = BTreeMap::new();
    let mut put = |k: String, val: String, line: usize| {
        if k.is_empty() || k.contains(['=', '\0']) {
            return Err(err(line, path, format!("{k:?}: not a variable name")));
        }
        if env.insert(k.clone(), val).is_some() {
            return Err(err(line, path, format!("{k} is set twice")));
        }
        Ok(())
    };
    let from_host = |k: &str, line| {
        err(
            line,
            path,
            format!("{k} takes its value from the shell running compose; write the value"),
        )
    };
    match v {
        Node::Map { entries, .. } => {
            for e in entries {
                if e.value.is_null() {
                    return Err(from_host(&e.key, e.line));
                }
                put(e.key.clone(), text(&e.value, path)?, e.line)?;
            }
        }
        Node::Seq { items, .. } => {
            for n in items {
                let kv = text(n, path)?;
                match kv.split_once('=') {
                    Some((k, val)) => put(k.to_string(), val.to_string(), n.line())?,
                    None => return Err(from_host(&kv, n.line())),
                }
            }
        }
        other => {
            return Err(err(
                other.line(),
                path,
                "expected a mapping or a list of KEY=VALUE",
            ))
        }
    }
    Ok(env)
}

fn port_number(s: &str, line: usize, path: &str) -> Result<u16, ComposeError> {
    if s.contains('-') {
        return Err(err(
            line,
            path,
            format!("{s:?}: port ranges are not supported"),
        ));
    }
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(err(line, path, format!("{s:?}: not a port"))),
    }
}

fn any_address(ip: &str, line: usize, path: &str) -> Result<(), ComposeError> {
    if ip.is_empty() || ip == "0.0.0.0" {
        Ok(())
    } else {
        Err(err(
            line,
            path,
            format!("{ip}: Ferry publishes on every address of the box; leave the address out"),
        ))
    }
}

fn port(v: &Node, path: &str) -> Result<PortSpec, ComposeError> {
    let line = v.line();
    if let Node::Map { entries, .. } = v {
        let (mut target, mut published, mut proto) = (None, None, Proto::Tcp);
        for e in entries {
            let p = format!("{path}.{}", e.key);
            match e.key.as_str() {
                "target" => target = Some(port_number(&text(&e.value, &p)?, e.line, &p)?),
                "published" => published = Some(port_number(&text(&e.value, &p)?, e.line, &p)?),
                "protocol" => proto = protocol(&text(&e.value, &p)?, e.line, &p)?,
                "host_ip" => any_address(&text(&e.value, &p)?, e.line, &p)?,
                "mode" if text(&e.value, &p)? == "host" => {}
                k => return Err(err(e.line, &p, format!("{k}: {}", refusal(k)))),
            }
        }
        let target = target.ok_or_else(|| err(line, path, "no target (the container's port)"))?;
        let host = published.ok_or_else(|| {
            err(
                line,
                path,
                "no published port: Ferry publishes fixed host ports",
            )
        })?;
        return Ok(PortSpec {
            host,
            container: target,
            proto,
        });
    }
    let s = text(v, path)?;
    if s.contains('[') {
        return Err(err(
            line,
            path,
            format!("{s:?}: Ferry publishes on every address; leave the address out"),
        ));
    }
    let (spec, proto) = match s.split_once('/') {
        Some((a, p)) => (a, protocol(p, line, path)?),
        None => (s.as_str(), Proto::Tcp),
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, container) = match parts.as_slice() {
        [_] => {
            return Err(err(
                line,
                path,
                format!("{s:?}: no host port; Ferry publishes fixed host ports (HOST:CONTAINER)"),
            ))
        }
        [h, c] => (*h, *c),
        [ip, h, c] => {
            any_address(ip, line, path)?;
            (*h, *c)
        }
        _ => {
            return Err(err(
                line,
                path,
                format!("{s:?}: not [ADDRESS:]HOST:CONTAINER[/PROTO]"),
            ))
        }
    };
    Ok(PortSpec {
        host: port_number(host, line, path)?,
        container: port_number(container, line, path)?,
        proto,
    })
}

fn protocol(p: &str, line: usize, path: &str) -> Result<Proto, ComposeError> {
    match p {
        "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        _ => Err(err(line, path, format!("{p:?}: tcp or udp"))),
    }
}

fn under_prefix(host: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| {
        let p = p.trim_end_matches('/');
        host == p
            || host
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

fn volume(v: &Node, path: &str, prefixes: &[String]) -> Result<BindSpec, ComposeError> {
    let line = v.line();
    let (source, target, read_only) = match v {
        Node::Map { entries, .. } => {
            let (mut kind, mut source, mut target, mut ro) = (None, None, None, false);
            for e in entries {
                let p = format!("{path}.{}", e.key);
                match e.key.as_str() {
                    "type" => kind = Some(text(&e.value, &p)?),
                    "source" => source = Some(text(&e.value, &p)?),
                    "target" => target = Some(text(&e.value, &p)?),
                    "read_only" => ro = boolean(&e.value, &p)?,
                    k => return Err(err(e.line, &p, format!("{k}: {}", refusal(k)))),
                }
            }
            match kind.as_deref() {
                Some("bind") => {}
                Some(k) => {
                    return Err(err(
                        line,
                        path,
                        format!("type {k}: only bind mounts of host directories are supported"),
                    ))
                }
                None => return Err(err(line, path, "no type (bind)")),
            }
            (
                source.ok_or_else(|| err(line, path, "no source"))?,
                target.ok_or_else(|| err(line, path, "no target"))?,
                ro,
            )
        }
        _ => {
            let s = text(v, path)?;
            let parts: Vec<&str> = s.split(':').collect();
            let (src, dst, mode) = match parts.as_slice() {
                [_] => {
                    return Err(err(
                        line,
                        path,
                        format!(
                            "{s:?}: anonymous volumes are not supported; bind a host directory"
                        ),
                    ))
                }
                [a, b] => (*a, *b, ""),
                [a, b, m] => (*a, *b, *m),
                _ => return Err(err(line, path, format!("{s:?}: not SOURCE:TARGET[:ro]"))),
            };
            let ro = match mode {
                "" | "rw" => false,
                "ro" => true,
                m => return Err(err(line, path, format!("{m:?}: ro or rw"))),
            };
            (src.to_string(), dst.to_string(), ro)
        }
    };
    if !source.starts_with('/') {
        let why = if source.starts_with('.') || source.starts_with('~') {
            "a path relative to the compose file means nothing on the box: write the absolute host path"
        } else {
            "named volumes are not created on the box: bind a host directory"
        };
        return Err(err(line, path, format!("{source:?}: {why}")));
    }
    if !target.starts_with('/') {
        return Err(err(
            line,
            path,
            format!("{target:?}: the container path must be absolute"),
        ));
    }
    if source.split('/').any(|s| s == "..") {
        return Err(err(line, path, format!("{source:?}: '..' is not allowed")));
    }
    if !under_prefix(&source, prefixes) {
        return Err(err(
            line,
            path,
            format!(
                "{source}: boxes bind only directories under {} (policy.allowed_bind_prefixes; \
                 --allowed-bind-prefix here)",
                prefixes.join(", ")
            ),
        ));
    }
    Ok(BindSpec {
        host: source,
        container: target,
        read_only,
    })
}

fn device(v: &Node, path: &str) -> Result<String, ComposeError> {
    let s = text(v, path)?;
    let parts: Vec<&str> = s.split(':').collect();
    let ok = match parts.as_slice() {
        [d] => Some(*d),
        [a, b] if a == b => Some(*a),
        [a, b, "rwm"] if a == b => Some(*a),
        _ => None,
    };
    let d = ok.ok_or_else(|| {
        err(
            v.line(),
            path,
            format!("{s:?}: a device is given to the app at its own path, with rwm (write /dev/X)"),
        )
    })?;
    if !d.starts_with("/dev/") {
        return Err(err(v.line(), path, format!("{d:?}: not a /dev path")));
    }
    Ok(d.to_string())
}

fn healthcheck(v: &Node, path: &str) -> Result<HealthSpec, ComposeError> {
    let mut h = HealthSpec {
        // No test: the image's own HEALTHCHECK, as Compose does.
        check: Some(HealthCheck::Docker {}),
        ..HealthSpec::default()
    };
    let mut disabled = false;
    for e in entries(v, path)? {
        let p = format!("{path}.{}", e.key);
        let n = &e.value;
        match e.key.as_str() {
            "test" => h.check = health_test(n, &p)?,
            "interval" => h.interval_s = Some(seconds(n, &p)?),
            "timeout" => h.timeout_s = Some(seconds(n, &p)?),
            "start_period" => h.grace_s = Some(seconds(n, &p)?),
            "retries" => {
                let r = number(n, &p)?;
                if r == 0 {
                    return Err(err(n.line(), &p, "must be positive"));
                }
                h.max_failures = Some(u32::try_from(r).unwrap_or(u32::MAX));
            }
            "disable" => disabled = boolean(n, &p)?,
            k => return Err(err(e.line, &p, format!("{k}: {}", refusal(k)))),
        }
    }
    if disabled {
        h = HealthSpec::default();
    }
    Ok(h)
}

fn health_test(v: &Node, path: &str) -> Result<Option<HealthCheck>, ComposeError> {
    let shell = |cmd: String| Some(HealthCheck::Exec(vec!["/bin/sh".into(), "-c".into(), cmd]));
    match v {
        Node::Seq { items, .. } => {
            let argv = items
                .iter()
                .map(|n| text(n, path))
                .collect::<Result<Vec<_>, _>>()?;
            match argv.split_first() {
                Some((k, [])) if k == "NONE" => Ok(None),
                Some((k, rest)) if k == "CMD" && !rest.is_empty() => {
                    Ok(Some(HealthCheck::Exec(rest.to_vec())))
                }
                Some((k, [cmd])) if k == "CMD-SHELL" => Ok(shell(cmd.clone())),
                _ => Err(err(
                    v.line(),
                    path,
                    "expected [\"CMD\", ARGS...], [\"CMD-SHELL\", \"COMMAND\"] or [\"NONE\"]",
                )),
            }
        }
        _ => {
            let cmd = text(v, path)?;
            if cmd.trim().is_empty() {
                return Err(err(v.line(), path, "an empty test"));
            }
            Ok(shell(cmd))
        }
    }
}
