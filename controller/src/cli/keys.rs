//! `ferryctl device keys | enroll | approve | revoke`: which key speaks for which device
//! (signed reports, PROTOCOL.md §9), through the controller's API.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::client::{blocking, Client, ServerArgs};
use crate::server::enrolment::KeyRecord;
use crate::server::KeyAnswer;
use crate::{table, Output};

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// Device id.
    #[arg(value_name = "ID")]
    pub device: String,
    /// The device's public key (SPKI PEM), e.g. from `ferry-agent identity` on the box.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// Device id.
    #[arg(value_name = "ID")]
    pub device: String,
    /// Approve only if the pending key's id starts with this (read it off the box with
    /// `ferry-agent identity`): guards against approving a key someone else sent.
    #[arg(long, value_name = "KEYID")]
    pub key: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Device id.
    #[arg(value_name = "ID")]
    pub device: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

pub async fn list(a: KeysArgs, out: Output) -> anyhow::Result<()> {
    let server = a.server.clone();
    let keys: Vec<KeyRecord> = blocking(move || Client::new(&server)?.get("/keys")).await?;
    if out.json {
        out.json_doc(&serde_json::to_value(&keys)?);
        return Ok(());
    }
    let mut t = table(&["DEVICE", "STATUS", "KEY", "VIA", "SINCE", "AGENT"]);
    for k in &keys {
        t.add_row(vec![
            k.device.clone(),
            k.status.as_str().into(),
            k.keyid[..16.min(k.keyid.len())].to_string(),
            k.via.clone(),
            crate::cli::fleet::ago(Some(k.since)),
            k.agent_version.clone().unwrap_or_default(),
        ]);
    }
    println!("{t}");
    let pending = keys
        .iter()
        .filter(|k| k.status.as_str() == "pending")
        .count();
    println!("{} key(s), {pending} pending", keys.len());
    Ok(())
}

fn answer(out: Output, a: &KeyAnswer) -> anyhow::Result<()> {
    if out.json {
        out.json_doc(&serde_json::to_value(a)?);
    } else {
        match &a.key {
            Some(k) => println!("{}: {} key {}", a.device, a.action, k.keyid),
            None => println!("{}: key {}", a.device, a.action),
        }
    }
    Ok(())
}

pub async fn enroll(a: EnrollArgs, out: Output) -> anyhow::Result<()> {
    let pem =
        std::fs::read_to_string(&a.key).with_context(|| format!("reading {}", a.key.display()))?;
    // Refuse a bad key here, with the file's name, before the server does.
    ferry_protocol::keys::PublicKey::from_pem(&pem)
        .with_context(|| format!("{} is not an Ed25519 public key", a.key.display()))?;
    let (server, path) = (a.server.clone(), format!("/devices/{}/key", a.device));
    let r: KeyAnswer = blocking(move || {
        Client::new(&server)?.post(&path, &serde_json::json!({ "public_key": pem }))
    })
    .await?;
    answer(out, &r)
}

pub async fn approve(a: ApproveArgs, out: Output) -> anyhow::Result<()> {
    let (server, path) = (a.server.clone(), format!("/devices/{}/approve", a.device));
    let body = serde_json::json!({ "keyid": a.key });
    let r: KeyAnswer = blocking(move || Client::new(&server)?.post(&path, &body)).await?;
    answer(out, &r)
}

pub async fn revoke(a: RevokeArgs, out: Output) -> anyhow::Result<()> {
    let (server, path) = (a.server.clone(), format!("/devices/{}/revoke", a.device));
    let r: KeyAnswer = blocking(move || Client::new(&server)?.post_bytes(&path, b"")).await?;
    answer(out, &r)
}
