//! Verification of incoming notices: the signature and record checks of the protocol crate plus
//! the device-side rules (own device id, sequence, time, downgrade, platform, local policy).

pub mod binds;
pub mod notice;
pub mod policy;
pub mod trust;

pub use notice::{check, Context, Decision, Rejection};
pub use policy::Policy;
