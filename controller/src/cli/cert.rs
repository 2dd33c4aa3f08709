//! `ferryctl cert ca | issue`: the fleet's broker PKI (README "A hardened broker").
//!
//! One fleet CA signs three kinds of certificates, all ECDSA P-256 (what every TLS stack on the
//! boxes and mosquitto's OpenSSL speak):
//! - `device`: the client certificate of one box. Its common name is the device id: the shipped
//!   mosquitto configuration takes the certificate's identity as the user name and the client
//!   id (`use_identity_as_username`, `use_username_as_clientid`), and its ACL lets a user publish
//!   only on `ferry/v1/devices/<user>/…` and read only its own `desired`.
//! - `controller`: a client certificate for the controller (or an operator's `ferryctl`); the
//!   ACL names the identities that read every device and write every `desired`. The controller
//!   holds two connections, so `--role controller` issues two certificates, NAME and
//!   NAME-notices (one client id each: with the identity as the client id, two connections on
//!   one certificate would take each other's session).
//! - `broker`: the broker's server certificate, for the host names and addresses given.
//!
//! Files: `ca.crt` / `ca.key`, `NAME.crt` / `NAME.key` (keys PKCS#8 PEM, mode 0600). Nothing is
//! overwritten without `--force`.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::{usage, write_atomic, Output};

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create the fleet CA: DIR/ca.crt and DIR/ca.key (keep the key offline).
    Ca(CaArgs),
    /// Issue a device, controller or broker certificate signed by the fleet CA.
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
pub struct CaArgs {
    /// Directory for ca.crt and ca.key (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The CA's common name.
    #[arg(long, default_value = "Ferry fleet CA", value_name = "NAME")]
    pub name: String,
    /// Validity in days.
    #[arg(long, default_value_t = 3650, value_name = "DAYS")]
    pub days: u32,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// A box: common name = device id, client authentication.
    Device,
    /// The controller (two certificates, NAME and NAME-notices), client authentication.
    Controller,
    /// The broker: server authentication for `--host` names and addresses.
    Broker,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The identity: a device id, the controller's user name, or the broker's host name.
    #[arg(value_name = "NAME")]
    pub name: String,
    #[arg(long, value_enum)]
    pub role: Role,
    /// Directory holding ca.crt and ca.key.
    #[arg(long, value_name = "DIR")]
    pub ca: PathBuf,
    /// Directory for NAME.crt and NAME.key (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A DNS name or IP address the broker is reached at (repeatable; default: NAME).
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 825, value_name = "DAYS")]
    pub days: u32,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

/// One certificate and key written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The names a certificate identity may take: a device id's alphabet (it becomes an MQTT user
/// name, a client id and a topic level, so no `/`, `+`, `#`).
pub fn check_identity(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "certificate name {name:?}: 1-64 letters, digits, '.', '_' and '-' (not starting with \
             '.' or '-')"
        ))
    }
}

fn validity(params: &mut CertificateParams, days: u32) -> anyhow::Result<()> {
    if days == 0 || days > 36_500 {
        return Err(usage(format!("--days {days}: between 1 and 36500")));
    }
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for boxes whose clock is a little behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from(serial.to_vec()));
    Ok(())
}

fn refuse_existing(paths: &[&Path], force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    for p in paths {
        if p.symlink_metadata().is_ok() {
            bail!(
                "{} already exists; refusing to overwrite it (use --force to replace it)",
                p.display()
            );
        }
    }
    Ok(())
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Create the fleet CA in `dir`.
pub fn create_ca(dir: &Path, name: &str, days: u32, force: bool) -> anyhow::Result<Issued> {
    let cert_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    refuse_existing(&[&cert_path, &key_path], force)?;
    make_dir(dir)?;
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days)?;
    let cert = params
        .self_signed(&key)
        .context("cannot sign the CA certificate")?;
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Issued {
        name: name.to_string(),
        cert: cert_path,
        key: key_path,
    })
}

fn load_issuer(ca_dir: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let read = |name: &str| {
        let p = ca_dir.join(name);
        fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
    };
    let key = KeyPair::from_pem(&read("ca.key")?)
        .with_context(|| format!("{}: not a PEM private key", ca_dir.join("ca.key").display()))?;
    Issuer::from_ca_cert_pem(&read("ca.crt")?, key)
        .with_context(|| format!("{}: not a CA certificate", ca_dir.join("ca.crt").display()))
}

fn sans(hosts: &[String]) -> anyhow::Result<Vec<SanType>> {
    hosts
        .iter()
        .map(|h| {
            Ok(match h.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    h.clone()
                        .try_into()
                        .map_err(|_| usage(format!("--host {h:?}: not a DNS name or address")))?,
                ),
            })
        })
        .collect()
}

fn issue_one(
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
    role: Role,
    hosts: &[String],
    days: u32,
    out: &Path,
    force: bool,
) -> anyhow::Result<Issued> {
    let cert_path = out.join(format!("{name}.crt"));
    let key_path = out.join(format!("{name}.key"));
    refuse_existing(&[&cert_path, &key_path], force)?;
    let key = KeyPair::generate().context("cannot generate a key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    match role {
        Role::Device | Role::Controller => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        Role::Broker => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let hosts = if hosts.is_empty() {
                vec![name.to_string()]
            } else {
                hosts.to_vec()
            };
            params.subject_alt_names = sans(&hosts)?;
        }
    }
    validity(&mut params, days)?;
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("cannot sign the certificate of {name}"))?;
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Issued {
        name: name.to_string(),
        cert: cert_path,
        key: key_path,
    })
}

/// Issue the certificate(s) of `args.name` for `args.role`.
pub fn issue(args: &IssueArgs) -> anyhow::Result<Vec<Issued>> {
    // A broker's name is a host name, checked as one by the SAN; the others are identities.
    if args.role != Role::Broker {
        check_identity(&args.name).map_err(usage)?;
    } else if args.name.is_empty() || args.name.contains('/') {
        return Err(usage(format!("broker name {:?}", args.name)));
    }
    if args.role != Role::Broker && !args.hosts.is_empty() {
        return Err(usage("--host is for --role broker"));
    }
    let issuer = load_issuer(&args.ca)?;
    make_dir(&args.out)?;
    let mut names = vec![args.name.clone()];
    if args.role == Role::Controller {
        names.push(format!("{}-notices", args.name));
    }
    names
        .iter()
        .map(|n| {
            issue_one(
                &issuer,
                n,
                args.role,
                &args.hosts,
                args.days,
                &args.out,
                args.force,
            )
        })
        .collect()
}

pub fn run(cmd: CertCommand, out: Output) -> anyhow::Result<()> {
    let issued = match cmd {
        CertCommand::Ca(a) => vec![create_ca(&a.out, &a.name, a.days, a.force)?],
        CertCommand::Issue(a) => issue(&a)?,
    };
    if out.json {
        out.json_doc(&serde_json::json!(issued
            .iter()
            .map(|i| serde_json::json!({"name": i.name, "cert": i.cert, "key": i.key}))
            .collect::<Vec<_>>()));
    } else {
        for i in &issued {
            println!(
                "{}: {} (key {}, mode 0600)",
                i.name,
                i.cert.display(),
                i.key.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn issue_args(ca: &Path, out: &Path, name: &str, role: Role) -> IssueArgs {
        IssueArgs {
            name: name.into(),
            role,
            ca: ca.into(),
            out: out.into(),
            hosts: vec![],
            days: 30,
            force: false,
        }
    }

    #[test]
    fn a_ca_signs_device_controller_and_broker_certificates_that_rustls_accepts() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        create_ca(&ca, "test CA", 30, false).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca.join("ca.key")), 0o600);
        let out = d.path().join("certs");
        let dev = issue(&issue_args(&ca, &out, "box-1", Role::Device)).unwrap();
        assert_eq!(dev.len(), 1);
        assert_eq!(mode(&dev[0].key), 0o600);
        let ctl = issue(&issue_args(&ca, &out, "ferry-controller", Role::Controller)).unwrap();
        let names: Vec<_> = ctl.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["ferry-controller", "ferry-controller-notices"]);
        let mut b = issue_args(&ca, &out, "localhost", Role::Broker);
        b.hosts = vec!["localhost".into(), "127.0.0.1".into()];
        issue(&b).unwrap();

        // The chain verifies: a rustls client verifier built on the CA accepts the device's
        // certificate, and one built on another CA does not.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pem = |p: PathBuf| fs::read(p).unwrap();
        let der = |bytes: Vec<u8>| {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_slice(&bytes).unwrap()
        };
        let verifier = |ca_pem: Vec<u8>| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(der(ca_pem)).unwrap();
            rustls::server::WebPkiClientVerifier::builder(roots.into())
                .build()
                .unwrap()
        };
        let now = rustls::pki_types::UnixTime::now();
        let v = verifier(pem(ca.join("ca.crt")));
        v.verify_client_cert(&der(pem(out.join("box-1.crt"))), &[], now)
            .expect("the device certificate chains to the fleet CA");
        let other = d.path().join("other");
        create_ca(&other, "other CA", 30, false).unwrap();
        assert!(verifier(pem(other.join("ca.crt")))
            .verify_client_cert(&der(pem(out.join("box-1.crt"))), &[], now)
            .is_err());

        // Nothing is overwritten without --force; the names are checked.
        let e = issue(&issue_args(&ca, &out, "box-1", Role::Device)).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(create_ca(&ca, "again", 30, false).is_err());
        assert!(issue(&issue_args(&ca, &out, "a/b", Role::Device)).is_err());
        assert!(issue(&issue_args(&ca, &out, "+", Role::Device)).is_err());
    }
}
