//! One client per remote API; they build requests and parse answers into typed results,
//! never touch the database and decide nothing about retries (that is `jobs`).

pub mod http;
pub mod rebill;
pub mod sign;
pub mod title;
pub mod title_payload;
pub mod title_reply;
pub mod token;
