//! Helpers shared by integration tests. Each test binary includes this with `mod common;`.
#![allow(dead_code)]

pub mod broker;
