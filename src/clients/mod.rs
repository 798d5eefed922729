//! One client per remote API; they build requests and parse answers, never touch the
//! database.

pub mod http;
pub mod rebill;
pub mod sign;
pub mod title;
pub mod title_payload;
pub mod title_reply;
pub mod token;
