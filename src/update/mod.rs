//! The update: state machine ([`state`]), journal ([`journal`]), plan ([`plan`]), pull
//! ([`pull`]), container swap ([`swap`]) and the engine that drives them ([`engine`]).

pub mod engine;
pub mod journal;
pub mod plan;
pub mod pull;
pub mod registry;
pub mod state;
pub mod swap;
