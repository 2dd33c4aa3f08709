//! Ferry updates itself (issue 13). An agent release is a release of the reserved app
//! [`ferry_protocol::release::AGENT_APP`]: a `FROM scratch` image holding one file,
//! `/ferry-agent`, per platform. The box fetches it into its content store like any image (by
//! digest, resumable), takes the binary out of the verified layer ([`extract`]), installs it
//! next to the running one and switches with one rename of a symlink ([`layout`]); the packaged
//! binary decides at every start which one runs and goes back on its own when a new one does not
//! confirm ([`launch`]).

pub mod extract;
pub mod launch;
pub mod layout;
