//! Shared helpers for the workspace tests (bootstrap stub).
