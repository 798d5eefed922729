//! Simulated remote servers.
