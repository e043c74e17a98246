//! Workspace root package: owns the examples and integration tests.

/// The README's Rust blocks, compiled (and run) as doctests so the documentation a newcomer
/// copies cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
