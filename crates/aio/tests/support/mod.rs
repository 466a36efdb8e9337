//! Shared helpers for the nbd-server integration tests: an independent NBD client
//! (`nbd_client`), the server child process and its scratch directory (`server`).

pub use ::nbd_client;
pub mod server;
