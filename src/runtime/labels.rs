//! Labels Ferry puts on every container it creates. The device label is the ownership mark:
//! Ferry never touches a container without its own device's label.

pub const DEVICE: &str = "io.ferry.device";
pub const APP: &str = "io.ferry.app";
pub const VERSION: &str = "io.ferry.version";
pub const DIGEST: &str = "io.ferry.digest";
/// The update sequence this container was created for.
pub const SEQUENCE: &str = "io.ferry.sequence";
/// `candidate` for a container created by an update (it becomes the running set when the
/// journal commits; the journal, not the label, is the source of truth).
pub const ROLE: &str = "io.ferry.role";
pub const ROLE_CANDIDATE: &str = "candidate";

/// The first path component of every image name this device's agent has the engine pull (the
/// images' ownership mark, as [`DEVICE`] is the containers'): `ferry-` and 12 hex digits of the
/// SHA-256 of the device id, a valid repository component whatever the device id looks like.
pub fn image_namespace(device: &str) -> String {
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(device.as_bytes()));
    format!("ferry-{}", &h[..12])
}

/// Whether `component` is some device's [`image_namespace`].
pub fn is_image_namespace(component: &str) -> bool {
    component.len() == 18
        && component.starts_with("ferry-")
        && component[6..].bytes().all(|b| b.is_ascii_hexdigit())
}
