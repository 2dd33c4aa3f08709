//! The update: state machine ([`state`]), journal ([`journal`]), plan ([`plan`]), the download
//! phase ([`download`], over [`crate::download`]), the wait before the switch ([`hold`]:
//! maintenance [`window`]s, app update [`lock`]s), container swap ([`swap`]), reports
//! ([`status`]), trust records ([`trust`]) and the engine that drives them ([`engine`]).

pub mod agent_step;
pub mod download;
pub mod engine;
pub mod hold;
pub mod inbox;
pub mod journal;
pub mod lock;
pub mod phases;
pub mod plan;
pub mod state;
pub mod status;
pub mod swap;
pub mod trust;
pub mod window;
