//! Workspace root package: owns the examples and integration tests.
