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
