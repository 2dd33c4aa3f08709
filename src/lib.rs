//! ferry-agent library.
