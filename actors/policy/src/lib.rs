//! Meridian's pure decisions, in a crate of their own so the compiler keeps them pure: nothing
//! here can reach an async runtime, an actor framework or an HTTP type (the only dependency is
//! `time`, for calendar months). Each takes what it decides on — loads, counts, records, the
//! time — as arguments, and is table-tested.
//!
//! - [`route`]: the order to try providers in, complexity classes, aliases, session affinity.
//! - [`breaker`]: a breaker's gate, open periods, and the window that decides a trip.
//! - [`retry`]: the node's retry budget, and waits that double.
//! - [`limit`]: limit kinds and their windows, a node's static share, slice sizes.
//! - [`cost`]: what a call costs, by kind of token, in whole millionths of a dollar.
//! - [`clock`]: the wall clock those decisions read, which a test can set.

pub mod breaker;
pub mod clock;
pub mod cost;
pub mod limit;
pub mod retry;
pub mod route;
